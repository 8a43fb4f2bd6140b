"""A run's results folder: resolved config, per-round metrics (JSON lines), final state.

``summary.json`` is written last and atomically: a folder without it is an unfinished run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fedllm.config import ExperimentConfig
from fedllm.results.tracking import Tracker, build_tracker


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ResultsWriter:
    def __init__(self, cfg: ExperimentConfig, root: Path | None = None, resume_dir: Path | None = None) -> None:
        self.metrics_path: Path
        self.cfg = cfg
        self.tracker: Tracker | None = None  # made at the first round logged (output.tracking)
        if resume_dir is not None:
            self.dir = Path(resume_dir)
            if not (self.dir / CHECKPOINT).is_file():
                raise FileNotFoundError(f"cannot resume {self.dir}: no {CHECKPOINT} (not a run folder?)")
            self.metrics_path = self.dir / "metrics.jsonl"
            self.records = read_metrics(self.dir) if self.metrics_path.is_file() else []
            return
        base = Path(cfg.output.dir).expanduser()
        if not base.is_absolute():
            base = (root or Path.cwd()) / base
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = base / cfg.run_name() / f"{stamp}-{cfg.digest()}"
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        self.metrics_path = self.dir / "metrics.jsonl"
        self.records = []

    def truncate_after(self, last_round: int) -> None:
        """Forget records past the checkpoint (a crash may have logged a round it did not save)."""
        self.records = [r for r in self.records if r["round"] <= last_round]
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))
        (self.dir / "summary.json").unlink(missing_ok=True)

    def log_samples(self, rnd: int, samples: list[dict[str, str]]) -> None:
        """A few generations of the global policy per evaluated round (samples.jsonl)."""
        with (self.dir / "samples.jsonl").open("a") as fh:
            for sample in samples:
                fh.write(json.dumps({"round": rnd, **sample}) + "\n")

    def log_round(self, record: dict[str, Any]) -> None:
        record = {k: _jsonable(v) for k, v in record.items()}
        self.records.append(record)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.cfg.output.tracking != "none":
            if self.tracker is None:
                self.tracker = build_tracker(self.cfg.output.tracking, self.dir, self.cfg.run_name(),
                                             self.cfg.model_dump(mode="json"))
            self.tracker.log_round(record)

    def finish(self, global_params: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
        torch.save(global_params, self.dir / "global_params.pt")
        atomic_write(self.dir / "summary.json", json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2))
        if self.tracker is not None:
            self.tracker.close()


CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomically replace the run's checkpoint: a crash leaves the previous one intact."""
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / CHECKPOINT, weights_only=False)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
