"""The one interface every channel model implements: ``transmit(batch, meta) -> (received, report)``."""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from fedllm.core.registry import Registry, validate_params
from fedllm.core.vectors import all_finite


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
    bits: torch.Tensor  # (clients,) payload bits (32 per float for analog links)
    dropped: torch.Tensor  # (clients,) bool: payload lost entirely
    symbols: torch.Tensor | None = None  # (clients,) channel uses (complex symbols)
    aggregated: bool = False  # True: ``received`` is one (1 x d) superposed sum (over-the-air)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def concat(cls, reports: list["ChannelReport"], order: list[int]) -> "ChannelReport":
        """One report of several batches sent apart (payloads of different sizes): row ``order[j]`` of the
        result is row j of the reports taken in turn; numeric extras are averaged over the clients."""
        at = torch.empty(len(order), dtype=torch.long)
        at[torch.tensor(order)] = torch.arange(len(order))

        def rows(field_: str) -> torch.Tensor:
            return torch.cat([getattr(r, field_) for r in reports])[at]

        symbols = rows("symbols") if all(r.symbols is not None for r in reports) else None
        sizes = [len(r.mse) for r in reports]
        extra = {k: sum(float(r.extra[k]) * n for r, n in zip(reports, sizes)) / sum(sizes)
                 for k in reports[0].extra if all(isinstance(r.extra.get(k), (int, float)) for r in reports)}
        return cls(rows("mse"), rows("snr_db"), rows("bits"), rows("dropped"), symbols, False, extra)

    def summary(self) -> dict[str, float]:
        finite = self.snr_db[torch.isfinite(self.snr_db)]
        out = {
            "channel_mse": float(self.mse.mean()) if len(self.mse) else 0.0,
            "channel_snr_db": float(finite.mean()) if len(finite) else float("inf"),
            "channel_bits": float(self.bits.sum()),
            "channel_dropped": int(self.dropped.sum()),
        }
        if self.symbols is not None:
            out["channel_symbols"] = float(self.symbols.sum())
        out.update({f"channel_{k}": float(v) for k, v in self.extra.items() if isinstance(v, (int, float))})
        return out


class Channel(ABC):
    """A channel model; ``Params`` validates its YAML section, ``seed`` makes it reproducible."""

    Params: ClassVar[type[ChannelParams]] = ChannelParams
    # Delivers every payload exactly as sent, whatever else is in the batch: the server may then add
    # the replies into a running sum as they arrive (strategy.running_sum) instead of sending a stack.
    lossless: ClassVar[bool] = False
    # What a client's payload becomes depends on it and the channel's noise alone, not on the rest of
    # the batch: the server may send each reply through the channel as it arrives (strategy.running_sum),
    # with noise from that client's own stream (:meth:`for_one`) so the draw does not depend on arrival order.
    independent: ClassVar[bool] = False

    def __init__(self, params: ChannelParams, seed: int = 0) -> None:
        self.params = params
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def delivers_sum(cls, params: Mapping[str, Any]) -> bool:
        """True when the server receives only the clients' superposed sum (over-the-air), not each payload."""
        return False

    @classmethod
    def takes_one_at_a_time(cls, params: Mapping[str, Any]) -> bool:
        """True when payloads may cross one by one (:attr:`lossless` or :attr:`independent`)."""
        return cls.lossless or cls.independent

    def segment_values(self) -> int | None:
        """A payload may cross this channel in consecutive segments whose lengths are multiples of this
        many values (the last one any length), sent in turn through one generator, each value meeting
        what it meets in one transmission (its packet's gain, power scale and noise law; the draws are
        other values of the same law), and no payload lost whole. None: the channel needs the payload
        whole (a per-payload scale, range or loss). A running sum over the channel then holds one
        segment of a reply at a time instead of the reply and its noise (fedllm/fusion/per_client_uplink.py)."""
        return None

    def for_one(self, key: str) -> "Channel":
        """This channel with a noise stream of its own, seeded by (seed, ``key``): a payload sent alone
        through it gets the same noise whichever payloads were sent before it (arrival order, resume)."""
        twin = copy.copy(self)
        twin.generator = torch.Generator().manual_seed(stream_seed(self.seed, key))
        return twin

    def lossless_report(self, clients: int, values: int) -> ChannelReport:
        """The report of a lossless channel's transmission of ``clients`` payloads of ``values`` each,
        without the payloads (they went into a running sum)."""
        raise NotImplementedError(f"{type(self).__name__} is not lossless: its report depends on the payloads")

    @abstractmethod
    def transmit(
        self, batch: torch.Tensor, meta: ClientMeta
    ) -> tuple[torch.Tensor, ChannelReport]:
        """Send a (clients x d) batch; return what the server receives and a report. Neither side
        writes into the other: a channel never changes ``batch`` (it may be the server's reply stack)
        and may return it as it is (the ideal channel does: a full copy of every payload spared)."""


CHANNELS: Registry[type[Channel]] = Registry("channel")


# --------------------------------------------------------------------------- shared math


def stream_seed(seed: int, key: str) -> int:
    """A 63-bit seed for the noise stream named ``key`` of a channel seeded ``seed``: streams of
    different keys are unrelated (a hash, not ``seed + i``, which would make neighbours overlap)."""
    return int(hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()[:16], 16) >> 1


def db_to_linear(db: float) -> float:
    return 10.0 ** (db / 10.0)


def check_batch(batch: torch.Tensor) -> None:
    """Channels are pure math on a finite (clients x d) float batch; anything else is a caller bug."""
    if batch.ndim != 2:
        raise ValueError(f"channel input must be (clients x d), got shape {tuple(batch.shape)}")
    if not torch.is_floating_point(batch):
        raise ValueError(f"channel input must be floating point, got {batch.dtype}")
    if not all_finite(batch):
        raise ValueError("channel input contains NaN/Inf; reject such payloads before transmission")


def to_symbols(batch: torch.Tensor) -> torch.Tensor:
    """Pack pairs of reals into complex baseband symbols: (n, d) -> (n, ceil(d/2)), zero-padded. A view
    of a float32 batch of even width when its layout allows (a column segment of a wider batch too):
    channels read their input and never write it, so a copy would only be one more batch at the peak."""
    n, d = batch.shape
    if d % 2:
        batch = torch.cat([batch, batch.new_zeros(n, 1)], dim=1)
    pairs = batch.to(torch.float32).reshape(n, -1, 2)
    if pairs.stride(2) != 1 or any(stride % 2 for stride in pairs.stride()[:2]):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def from_symbols(symbols: torch.Tensor, d: int) -> torch.Tensor:
    return torch.view_as_real(symbols).reshape(symbols.shape[0], -1)[:, :d]


def complex_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Circular complex Gaussian CN(0, 1): real and imaginary parts each of variance 1/2."""
    return torch.randn(shape, dtype=torch.complex64, generator=generator)


def packets(num_symbols: int, packet_size: int | None) -> tuple[int, int]:
    """(number of packets, packet length) covering ``num_symbols`` (last one zero-padded)."""
    size = num_symbols if not packet_size else min(packet_size, max(1, num_symbols))
    return -(-num_symbols // size), size


def measured_report(sent: torch.Tensor, received: torch.Tensor, bits: torch.Tensor,
                    dropped: torch.Tensor | None = None, symbols: torch.Tensor | None = None,
                    **extra: Any) -> ChannelReport:
    """MSE and effective SNR measured from what was sent and what arrived, per client."""
    n, d = sent.shape
    # row by row: the difference of the whole batch would be one more batch-sized copy at the server's peak
    err = torch.stack([torch.linalg.vector_norm(r - s) for r, s in zip(received, sent)]).pow(2) / max(d, 1) \
        if n else torch.zeros(0)
    power = torch.linalg.vector_norm(sent, dim=1).pow(2) / max(d, 1)
    snr = torch.where(err > 0, 10 * torch.log10(power.clamp_min(1e-30) / err.clamp_min(1e-30)),
                      torch.full_like(err, float("inf")))
    return ChannelReport(mse=err, snr_db=snr, bits=bits.to(torch.float64),
                         dropped=dropped if dropped is not None else torch.zeros(n, dtype=torch.bool),
                         symbols=symbols, extra=dict(extra))


def validate_channel_params(kind: str, params: Mapping[str, Any]) -> ChannelParams:
    """Validate a channel's parameters, raising ValueError that names the bad key."""
    return validate_params(CHANNELS.get(kind).Params, params, "channel", kind)  # type: ignore[return-value]


def build_channel(kind: str, params: Mapping[str, Any], seed: int) -> Channel:
    cls = CHANNELS.get(kind)
    return cls(validate_channel_params(kind, params), seed=seed)
