"""A tiny name -> object registry for the pluggable parts (channels, fusion rules, trainers).

A new channel, fusion rule or trainer is one file that decorates itself with
``@REGISTRY.register("name")``; the config validates names against the registry so a
typo stops the run before any training, with the allowed names in the message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised for a name that is not registered; the message lists the allowed names."""


class Registry(Generic[T]):
    """Maps names to implementations of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def validate_params(params_model: type[BaseModel], params: Mapping[str, Any], section: str, name: str) -> BaseModel:
    """Validate a component's YAML parameters; the error names ``section.key`` and the allowed keys."""
    try:
        return params_model(**params)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                allowed = ", ".join(params_model.model_fields) or "(none)"
                msg = f"unknown key (allowed keys for {name!r}: {allowed})"
            lines.append(f"{section}.{key}: {msg}")
        raise ValueError("; ".join(lines)) from None
