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
    """Load an experiment YAML (``None``: all defaults) and apply overrides."""
    return config_from_dict(read_experiment_yaml(path) if path else {}, overrides)


def config_from_json(text: str) -> ExperimentConfig:
    return config_from_dict(json.loads(text))


def save_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as the YAML written into every results folder."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
