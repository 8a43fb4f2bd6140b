"""Experiment sets for ``fedllm compare``: files, folders and ``sweep:`` blocks, and the result cache.

A YAML may carry a ``sweep:`` block mapping dotted keys to lists of values; it expands to the
cartesian product (``strategy.name: [fedavg, median]`` x ``seed: [0, 1]`` = 4 runs). A run's
results are found again by the hash of its resolved config, so re-running a comparison only
runs what has no finished results yet.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedllm.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    parse_overrides,
    read_experiment_yaml,
    unpinned_sweep,
)


@dataclass
class PlannedRun:
    source: Path
    overrides: dict[str, Any]  # the sweep point (dotted keys), for labels
    config: ExperimentConfig


def expand_sweep(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product of a ``sweep:`` block: ``{key: [values]}`` -> list of ``{key: value}``."""
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError("sweep: must map dotted keys to lists of values, e.g. {channel.snr_db: [0, 10]}")
    keys = list(sweep)
    for key in keys:
        if not isinstance(sweep[key], list) or not sweep[key]:
            raise ConfigError(f"sweep.{key}: must be a non-empty list of values")
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def _override_items(point: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in point.items()]


def plan(paths: list[Path], extra_overrides: list[str] | None = None) -> list[PlannedRun]:
    """Every run the given files, folders and sweep blocks describe, validated up front. A swept key that
    ``extra_overrides`` also sets is not swept: the override wins, so its points would be one config."""
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    if not files:
        raise ConfigError(f"no experiment YAML found in {', '.join(map(str, paths))}")
    extras = list(extra_overrides or [])
    pinned = parse_overrides(extras)
    runs = []
    for path in files:
        raw = read_experiment_yaml(path)
        sweep = raw.pop("sweep", None)
        points: list[dict[str, Any]] = [{}]
        if sweep is not None:
            expand_sweep(sweep)  # validates the whole block, pinned keys included
            free = unpinned_sweep(sweep, pinned)
            points = expand_sweep(free) if free else [{}]
        for point in points:
            try:
                cfg = config_from_dict(raw, _override_items(point) + extras)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
            runs.append(PlannedRun(path, point, cfg))
    return runs


def finished_run(cfg: ExperimentConfig, root: Path | None = None) -> Path | None:
    """The newest finished results folder of exactly this resolved config, if any."""
    base = Path(cfg.output.dir) if Path(cfg.output.dir).is_absolute() else (root or Path.cwd()) / cfg.output.dir
    done = sorted((base / cfg.run_name()).glob(f"*-{cfg.digest()}/summary.json"))
    return done[-1].parent if done else None
