"""The one interface every channel model implements: ``transmit(batch, meta) -> (received, report)``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fedllm.registry import Registry


class ChannelParams(BaseModel):
    """Base for a channel's YAML parameters; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ClientMeta:
    """Per-client facts a channel may use (path loss, power control, weighting)."""

    ids: list[str]
    num_examples: torch.Tensor  # (clients,)
    tx_power: torch.Tensor | None = None  # (clients,), defaults to 1 per client

    def power(self) -> torch.Tensor:
        if self.tx_power is None:
            return torch.ones(len(self.ids))
        return self.tx_power


@dataclass
class ChannelReport:
    """What the channel did to each client's payload, for the round's metrics."""

    mse: torch.Tensor  # (clients,) mean squared error per entry
    snr_db: torch.Tensor  # (clients,) effective SNR; +inf for a noiseless link
    bits: torch.Tensor  # (clients,) bits put on the air
    dropped: torch.Tensor  # (clients,) bool: payload lost entirely
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        finite = self.snr_db[torch.isfinite(self.snr_db)]
        return {
            "channel_mse": float(self.mse.mean()) if len(self.mse) else 0.0,
            "channel_snr_db": float(finite.mean()) if len(finite) else float("inf"),
            "channel_bits": float(self.bits.sum()),
            "channel_dropped": int(self.dropped.sum()),
        }


class Channel(ABC):
    """A channel model; ``Params`` validates its YAML section, ``seed`` makes it reproducible."""

    Params: ClassVar[type[ChannelParams]] = ChannelParams

    def __init__(self, params: ChannelParams, seed: int = 0) -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(seed)

    @abstractmethod
    def transmit(
        self, batch: torch.Tensor, meta: ClientMeta
    ) -> tuple[torch.Tensor, ChannelReport]:
        """Send a (clients x d) batch; return what the server receives and a report."""


CHANNELS: Registry[type[Channel]] = Registry("channel")


def validate_channel_params(kind: str, params: Mapping[str, Any]) -> ChannelParams:
    """Validate a channel's parameters, raising ValueError that names the bad key."""
    cls = CHANNELS.get(kind)
    try:
        return cls.Params(**params)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            allowed = ", ".join(cls.Params.model_fields) or "(none)"
            hint = f" (allowed keys for {kind!r}: {allowed})" if e["type"] == "extra_forbidden" else ""
            lines.append(f"channel.{key}: {e['msg']}{hint}")
        raise ValueError("; ".join(lines)) from None


def build_channel(kind: str, params: Mapping[str, Any], seed: int) -> Channel:
    cls = CHANNELS.get(kind)
    return cls(validate_channel_params(kind, params), seed=seed)
