"""Optional experiment tracking: every round's numbers also go to TensorBoard or MLflow.

Off by default (``output.tracking: none``); the results folder stays the record of a run, and a
tracker is a view of it for people who live in those tools. TensorBoard event files go to
``<run>/tensorboard`` (``tensorboard --logdir results``); MLflow logs to ``$MLFLOW_TRACKING_URI``
when set, else to a SQLite store in ``<run>/mlflow.db`` (``mlflow ui --backend-store-uri
sqlite:///<run>/mlflow.db``). Scalars are the numeric top-level keys of each
round record (``accuracy``, ``reward``, ``train_loss``, ``bytes_up``, ``accuracy/<task>``...)
at step = round; MLflow also gets the flattened config as parameters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from fedllm.core.optional import check_installed


class Tracker(Protocol):
    def log_round(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round" and math.isfinite(v)}


def mlflow_params(config: dict[str, Any]) -> dict[str, str]:
    """The config as MLflow parameters: dotted keys, values as text cut to MLflow's 250 characters."""
    from fedllm.config import dotted_leaves

    return {k: str(v)[:250] for k, v in dotted_leaves(config).items()}


class TensorBoardTracker:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_round(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        import os

        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow 3 refuses its old file store: a SQLite file
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        mlflow.start_run(run_name=run_name)
        mlflow.log_params(mlflow_params(config))

    def log_round(self, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars(record).items()},
                                step=int(record["round"]))

    def close(self) -> None:
        self.mlflow.end_run()


def build_tracker(kind: str, run_dir: Path, run_name: str, config: dict[str, Any]) -> Tracker | None:
    if kind == "none":
        return None
    check_installed(kind)
    return TensorBoardTracker(run_dir) if kind == "tensorboard" else MLflowTracker(run_dir, run_name, config)
