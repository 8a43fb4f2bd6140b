"""fedllm's Python API: run and compare experiments, read results back as tables.

Everything here is what the ``fedllm`` command does, as functions that return values instead of
printing: the same simulation engine, the same results folders, the same config validation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedllm.apps.simulation import Comparison, compare_experiments, simulate
from fedllm.config import ExperimentConfig, config_from_dict, load_config
from fedllm.results.report import RunResult, find_runs, load_run


def _config(experiment: str | Path | ExperimentConfig | Mapping[str, Any] | None,
            overrides: str | list[str] | None) -> ExperimentConfig:
    if isinstance(experiment, ExperimentConfig):
        return config_from_dict(experiment.model_dump(mode="json"), overrides) if overrides else experiment
    if isinstance(experiment, Mapping):
        return config_from_dict(dict(experiment), overrides)
    return load_config(experiment, overrides)


def run_experiment(experiment: str | Path | ExperimentConfig | Mapping[str, Any] | None = None, clients: int = 4,
                   overrides: str | list[str] | None = None, resume: str | Path | None = None,
                   echo: Callable[[str], None] = print) -> RunResult:
    """Run one experiment with ``clients`` simulated edge clients (``data.num_clients`` wins when set).

    ``experiment`` is a YAML path, a config, a mapping of sections, or ``None`` for the defaults;
    ``overrides`` are ``section.key=value`` items as in ``--set``. Returns the finished run: its
    folder, resolved config, per-round records (``.frame()`` as a pandas table) and summary.
    Raises :class:`fedllm.ConfigError` / :class:`fedllm.DataError` for bad input, before training."""
    cfg = _config(experiment, overrides)
    folder = simulate(cfg, cfg.data.num_clients or clients, resume=Path(resume) if resume else None, echo=echo)
    return load_run(folder)


def compare(experiments: Iterable[str | Path], overrides: list[str] | None = None, clients: int = 4,
            rerun: bool = False, out: str | Path | None = None, target: float | None = None,
            echo: Callable[[str], None] = print) -> Comparison:
    """``fedllm compare``: run what has no finished results yet, then write and return the comparison
    (markdown table, plot files, the runs' folders)."""
    return compare_experiments([Path(e) for e in experiments], overrides, clients, rerun,
                               Path(out) if out else None, target, echo)


def load_results(folder: str | Path):
    """Every round of every finished run under ``folder`` (a run folder or a parent of runs) as one
    pandas DataFrame: one row per run and round, with ``run`` (the folder) and ``experiment``."""
    import pandas as pd

    runs = find_runs([Path(folder)])
    if not runs:
        raise FileNotFoundError(f"no finished runs (folders with summary.json) under {folder}")
    return pd.concat([run.frame() for run in runs], ignore_index=True)
