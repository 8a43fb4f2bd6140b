"""A run's results folder: resolved config, per-round metrics (JSON lines), final state.

Every file is written whole or not at all (a temporary file renamed into place); ``summary.json``
is written last: a folder without it is an unfinished run, and its last checkpoint resumes it.
Each run gets a folder of its own, even two runs of one config started in the same second. A
write that fails (a full disk, a folder that vanished) stops the run with :class:`StorageError`,
one line that names the path, and the previous checkpoint stays as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from fedllm.config import ExperimentConfig
from fedllm.core.errors import ConfigError, StorageError
from fedllm.core.store import write_atomically
from fedllm.results.tracking import Tracker, build_tracker

CHECKPOINT = "checkpoint.pt"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it into place; on failure the
    temporary file is removed and ``path`` keeps its old content."""
    try:
        write_atomically(path, write)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        full = getattr(exc, "errno", None) == errno.ENOSPC or "unexpected pos" in str(exc) or "No space" in str(exc)
        cause = "no space left" if full else (getattr(exc, "strerror", None) or str(exc).splitlines()[0])
        raise StorageError(f"{cause} on {path.parent} while writing {path.name}; the last complete checkpoint "
                           "is kept (free space, then resume the run)") from None


def atomic_write(path: Path, text: str) -> None:
    _write_whole(path, lambda tmp: tmp.write_text(text))


def results_base(cfg: ExperimentConfig, root: Path | None = None) -> Path:
    base = Path(cfg.output.dir).expanduser()
    return base if base.is_absolute() else (root or Path.cwd()) / base


def check_results_dir(cfg: ExperimentConfig, root: Path | None = None) -> Path:
    """Fail before anything starts when ``output.dir`` cannot hold a run (a file, no permission, a
    read-only or virtual file system): one line naming the folder and the fix."""
    base = results_base(cfg, root)
    probe = base / f".fedllm-write-test-{os.getpid()}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output.dir {str(base)!r}: cannot write results there ({exc.strerror or exc}); choose a "
                          "writable folder (output.dir, or results-dir / $FEDLLM_RESULTS under flwr run)") from None
    return base


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
        parent = check_results_dir(cfg, root) / cfg.run_name()
        parent.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.digest()}"
        for attempt in range(1, 1000):  # a folder of its own, even for two runs started in the same second
            self.dir = parent / (name if attempt == 1 else f"{name}-{attempt}")
            try:
                self.dir.mkdir()
                break
            except FileExistsError:
                continue
        atomic_write(self.dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        self.metrics_path = self.dir / "metrics.jsonl"
        self.records = []

    def _rewrite_metrics(self) -> None:
        atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))

    def truncate_after(self, last_round: int) -> None:
        """Forget records past the checkpoint (a crash may have logged a round it did not save)."""
        self.records = [r for r in self.records if r["round"] <= last_round]
        self._rewrite_metrics()
        (self.dir / "summary.json").unlink(missing_ok=True)

    def log_samples(self, rnd: int, samples: list[dict[str, str]]) -> None:
        """A few generations of the global policy per evaluated round (samples.jsonl)."""
        path = self.dir / "samples.jsonl"
        old = path.read_text() if path.is_file() else ""
        atomic_write(path, old + "".join(json.dumps({"round": rnd, **s}) + "\n" for s in samples))

    def log_round(self, record: dict[str, Any]) -> None:
        record = {k: _jsonable(v) for k, v in record.items()}
        self.records.append(record)
        self._rewrite_metrics()
        if self.cfg.output.tracking != "none":
            if self.tracker is None:
                self.tracker = build_tracker(self.cfg.output.tracking, self.dir, self.cfg.run_name(),
                                             self.cfg.model_dump(mode="json"))
            self.tracker.log_round(record)

    def finish(self, global_params: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
        _write_whole(self.dir / "global_params.pt", lambda tmp: torch.save(global_params, tmp))
        atomic_write(self.dir / "summary.json", json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2))
        if self.tracker is not None:
            self.tracker.close()


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomically replace the run's checkpoint: a crash or a full disk leaves the previous one intact."""
    _write_whole(run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / CHECKPOINT, weights_only=False)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
