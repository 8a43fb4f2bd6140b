"""A tiny name -> object registry for the pluggable parts (channels, fusion rules, trainers,
rewards, workloads).

A new channel, fusion rule or trainer is one file that decorates itself with
``@REGISTRY.register("name")``; the config validates names against the registry so a
typo stops the run before any training, with the allowed names in the message. An entry may
carry a ``Params`` pydantic model: its parameters in the YAML, validated by :func:`validate_params`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fedllm.core.errors import allowed_keys, validation_messages

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised for a name that is not registered; the message lists the allowed names."""


class NoParams(BaseModel):
    """The parameters of an entry that takes none: any key is an error."""

    model_config = ConfigDict(extra="forbid")


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

    def params_model(self, name: str) -> type[BaseModel]:
        """The ``Params`` model of entry ``name`` (no parameters when it declares none)."""
        return getattr(self.get(name), "Params", NoParams)

    def validate(self, name: str, params: Mapping[str, Any], section: str, common: tuple[str, ...] = ()) -> BaseModel:
        return validate_params(self.params_model(name), params, section, name, common)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def validate_params(params_model: type[BaseModel], params: Mapping[str, Any], section: str, name: str,
                    common: tuple[str, ...] = ()) -> BaseModel:
    """Validate a component's YAML parameters; the error names ``section.key`` and the allowed keys
    (``common``: the keys the section itself takes besides the component's own)."""
    try:
        return params_model(**params)
    except ValidationError as err:
        own = allowed_keys(params_model)
        hint = (f"; allowed: {', '.join(common)}, and for {name!r}: {own}" if common
                else f" (allowed keys for {name!r}: {own})")
        raise ValueError("; ".join(validation_messages(err, section, lambda loc: hint))) from None
