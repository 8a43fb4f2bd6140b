"""Block fading (Rayleigh, Rician with K factor) with ZF or LMMSE equalisation, perfect or imperfect CSI.

One complex gain per packet and client; the gains' power |h|^2 is reported in
``report.extra["gain_power"]`` (clients x packets) so results can be checked against the
conditional closed form: with ZF and perfect CSI, a packet's MSE is E[x^2] / (SNR beta |h|^2).
"""

from __future__ import annotations

import math

import torch
from pydantic import NonNegativeFloat

from .base import (
    CHANNELS,
    Channel,
    ChannelReport,
    ClientMeta,
    check_batch,
    complex_noise,
    from_symbols,
    measured_report,
    packets,
    to_symbols,
)
from .link import FadingParams, link_segment_values, transmit_link


class RicianParams(FadingParams):
    k_factor: NonNegativeFloat = 3.0


class _FadingChannel(Channel):
    Params = FadingParams
    independent = True

    def segment_values(self) -> int | None:
        return link_segment_values(self.params)

    def gains(self, n: int, blocks: int) -> torch.Tensor:
        return complex_noise((n, blocks), self.generator)  # Rayleigh: h ~ CN(0, 1)

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        n, d = batch.shape
        symbols = to_symbols(batch)
        blocks, _ = packets(symbols.shape[1], self.params.packet_size)
        h = self.gains(n, blocks)
        est = transmit_link(symbols, self.params, meta, self.generator, self.seed, gains=h,
                            equalizer=self.params.equalizer, csi_error_var=self.params.csi_error_var)
        received = from_symbols(est, d)
        return received, measured_report(batch, received, torch.full((n,), 32.0 * d),
                                         symbols=torch.full((n,), float(symbols.shape[1])),
                                         gain_power=h.abs().pow(2))


@CHANNELS.register("rayleigh")
class RayleighChannel(_FadingChannel):
    pass


@CHANNELS.register("rician")
class RicianChannel(_FadingChannel):
    Params = RicianParams

    def gains(self, n: int, blocks: int) -> torch.Tensor:
        k = self.params.k_factor
        phase = 2 * math.pi * torch.rand((n, blocks), generator=self.generator)
        los = math.sqrt(k / (k + 1)) * torch.polar(torch.ones(n, blocks), phase)
        return los + math.sqrt(1 / (k + 1)) * complex_noise((n, blocks), self.generator)
