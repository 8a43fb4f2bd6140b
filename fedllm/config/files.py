"""Loading an experiment: YAML files, dictionaries and the JSON clients receive, into one
validated :class:`ExperimentConfig`, with errors phrased for the user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedllm.config.experiment import ExperimentConfig
from fedllm.config.overrides import deep_merge, parse_overrides
from fedllm.config.sections import TaskSpec
from fedllm.core.errors import ConfigError, allowed_keys, validation_messages


def _allowed_keys_hint(loc: tuple[Any, ...]) -> str:
    """What may stand where the unknown key ``loc`` was found (nothing to say inside a free mapping)."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if annotation is TaskSpec or str(part) == "tasks":
            model = TaskSpec
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return ""
    return f"; allowed: {allowed_keys(model)}"


def format_config_error(err: ValidationError) -> str:
    return "invalid experiment config:\n" + "\n".join(
        f"  {line}" for line in validation_messages(err, unknown_key_hint=_allowed_keys_hint))


def config_from_dict(raw: dict[str, Any], overrides: str | list[str] | None = None) -> ExperimentConfig:
    data = deep_merge(raw, parse_overrides(overrides))
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_config_error(err)) from None


def read_experiment_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in an experiment file; missing files and YAML errors in one line (file:line:column)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file not found: {p} (give a path to a YAML file)")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"experiment file {p}{where} is not valid YAML: {what}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"experiment file {p} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None, overrides: str | list[str] | None = None) -> ExperimentConfig:
    """Load an experiment YAML (``None``: all defaults) and apply overrides. A file with a ``sweep:``
    block is one experiment once the overrides pin every key it sweeps (``--set data.alpha=0.1``);
    otherwise the error lists the points to choose from."""
    raw = read_experiment_yaml(path) if path else {}
    sweep = raw.pop("sweep", None)
    if sweep is not None:
        unpinned = unpinned_sweep(sweep, parse_overrides(overrides))
        if unpinned:
            choices = "; ".join(f"{key} over {values}" for key, values in unpinned.items())
            items = [f"{key}={_yaml_value(values[0])}" for key, values in unpinned.items()]
            example = " ".join(f"--set '{item}'" if " " in item else f"--set {item}" for item in items)
            raise ConfigError(f"{path} is a sweep ({choices}): pick one point with {example} (under flwr run: "
                              f"overrides='{' '.join(items)}'), run them all with fedllm run --all, or compare them "
                              f"with fedllm compare {path}")
    return config_from_dict(raw, overrides)


def unpinned_sweep(sweep: Any, overrides: dict[str, Any]) -> dict[str, list[Any]]:
    """The part of a ``sweep:`` block that no override pins (``overrides`` nested, as parse_overrides gives):
    an override beats the sweep, so a pinned key is one point, not several runs of the same config."""
    if not isinstance(sweep, dict):
        raise ConfigError("sweep: must map dotted keys to lists of values, e.g. {channel.snr_db: [0, 10]}")
    out = {}
    for key, values in sweep.items():
        node: Any = overrides
        for part in str(key).split("."):
            node = node.get(part) if isinstance(node, dict) and part in node else _MISSING
        if node is _MISSING:
            out[str(key)] = list(values) if isinstance(values, list) else [values]
    return out


_MISSING = object()


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def config_from_json(text: str) -> ExperimentConfig:
    return config_from_dict(json.loads(text))


def save_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as the YAML written into every results folder."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
