"""A chain of channels applied in order, e.g. quantize then rayleigh (digital payload, analog link).

YAML: ``channel: {kind: compose, chain: [{kind: quantize, bits: 8}, {kind: rayleigh, snr_db: 10}]}``.
The report measures the end-to-end error; bits are the fewest any stage reports (the digital
stage's count), drops accumulate. Over-the-air (``ota``) may only be the last stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, field_validator

from .base import (
    CHANNELS,
    Channel,
    ChannelParams,
    ChannelReport,
    ClientMeta,
    build_channel,
    check_batch,
    measured_report,
    validate_channel_params,
)


class ComposeParams(ChannelParams):
    chain: list[dict[str, Any]] = Field(min_length=1)

    @field_validator("chain")
    @classmethod
    def _valid_stages(cls, chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, stage in enumerate(chain):
            if "kind" not in stage:
                raise ValueError(f"chain[{i}] needs a 'kind'")
            if stage["kind"] == "ota" and i != len(chain) - 1:
                raise ValueError("ota sums the clients' signals, so it can only be the last stage of a chain")
            validate_channel_params(stage["kind"], {k: v for k, v in stage.items() if k != "kind"})
        return chain


@CHANNELS.register("compose")
class ComposedChannel(Channel):
    Params = ComposeParams

    @classmethod
    def delivers_sum(cls, params: Mapping[str, Any]) -> bool:
        last = params.get("chain", [{}])[-1]
        return CHANNELS.get(last.get("kind", "ideal")).delivers_sum(last)

    @classmethod
    def takes_one_at_a_time(cls, params: Mapping[str, Any]) -> bool:
        return all(CHANNELS.get(stage.get("kind", "ideal")).takes_one_at_a_time(stage)
                   for stage in params.get("chain", []))

    def segment_values(self) -> int | None:
        """Segments every stage can take: a multiple of each stage's, when each stage takes segments."""
        quanta = [stage.segment_values() for stage in self.stages]
        return None if any(q is None for q in quanta) else math.lcm(*quanta)  # type: ignore[arg-type]

    def for_one(self, key: str) -> "ComposedChannel":
        twin = super().for_one(key)
        twin.stages = [stage.for_one(key) for stage in self.stages]  # each stage its own stream (own seed)
        return twin

    def __init__(self, params: ComposeParams, seed: int = 0) -> None:
        super().__init__(params, seed)
        self.stages = [build_channel(s["kind"], {k: v for k, v in s.items() if k != "kind"}, seed + 7919 * i)
                       for i, s in enumerate(params.chain)]

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        x = batch
        bits = torch.full((batch.shape[0],), float("inf"), dtype=torch.float64)
        dropped = torch.zeros(batch.shape[0], dtype=torch.bool)
        last = None
        for stage in self.stages:
            x, last = stage.transmit(x, meta)
            bits = torch.minimum(bits, last.bits)
            dropped |= last.dropped
        assert last is not None
        if last.aggregated:
            last.bits, last.dropped = bits, dropped
            return x, last
        return x, measured_report(batch, x, bits, dropped=dropped, symbols=last.symbols)
