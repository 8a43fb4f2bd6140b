"""The errors fedllm shows to its users, and the one formatter of validation errors.

A :class:`ConfigError` or :class:`DataError` is the user's input being wrong; its message names
the key or the file and says what is allowed, so the CLI prints it as one line and exits with
code 2. Both pydantic sections of the experiment config and the parameter models of plugins
(channels, fusion rules, trainers, rewards) format their validation errors here, so a bad key
reads the same wherever it sits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config problem, phrased for the user: which key, what is wrong, what is allowed."""


class DataError(ValueError):
    """A data problem phrased for the user (missing file, bad label, empty partition)."""


class StorageError(OSError):
    """The results folder could not be written; the message names the path and the cause."""


def allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields) or "(none)"


def validation_messages(err: ValidationError, prefix: str = "",
                        unknown_key_hint: Callable[[tuple[Any, ...]], str] = lambda loc: "") -> list[str]:
    """One ``key: message`` line per error of ``err``; keys are dotted and start with ``prefix``.

    ``unknown_key_hint(loc)`` is appended to "unknown key" for a key that is not allowed at
    ``loc``: what is allowed there (e.g. "; allowed: model, peft")."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in (prefix, *loc) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + unknown_key_hint(loc)
        # a section's own check may already name the key in full (strategy.k: ...): say it once
        lines.append(msg if not key or msg.startswith(f"{key}.") else f"{key}: {msg}")
    return lines
