"""Over-the-air computation: clients transmit at once and the server receives the noisy weighted sum.

Per fading block (``packet_size`` symbols) client k has gain h_k ~ CN(0, 1). With truncated
channel inversion, a client whose |h_k|^2 is below ``truncation_threshold`` stays silent in that
block; the others send sqrt(eta) w_k s_k / h_k, with w_k its example weight and eta the largest
common scale that keeps every active client within its power P. The superposition is
y = sqrt(eta) sum_active w_k s_k + n; the server divides by sqrt(eta) times the active weight, so
it gets the weighted mean of the active clients plus noise, directly (``report.aggregated``).
Only FedAvg can use it: there are no per-client updates to fuse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt

from .base import (
    CHANNELS,
    Channel,
    ChannelParams,
    ChannelReport,
    ClientMeta,
    check_batch,
    complex_noise,
    db_to_linear,
    from_symbols,
    packets,
    to_symbols,
)


class OtaParams(ChannelParams):
    snr_db: float = Field(10.0, description="P / sigma^2 at the server; .inf for noiseless")
    packet_size: PositiveInt | None = 4096
    tx_power_db: float = 0.0
    truncation_threshold: NonNegativeFloat = Field(0.1, description="min |h|^2 to transmit in a block")


@CHANNELS.register("ota")
class OverTheAirChannel(Channel):
    Params = OtaParams

    @classmethod
    def delivers_sum(cls, params: Mapping[str, Any]) -> bool:
        return True

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        n, d = batch.shape
        prm = self.params
        weights = (meta.num_examples / meta.num_examples.sum()).to(torch.float32).view(n, 1)
        sym = to_symbols(batch)
        m = sym.shape[1]
        blocks, size = packets(m, prm.packet_size)
        s = torch.zeros(n, blocks * size, dtype=sym.dtype)
        s[:, :m] = sym
        s = s.view(n, blocks, size)
        h = complex_noise((n, blocks), self.generator)
        active = h.abs().pow(2) >= prm.truncation_threshold  # (n, blocks)
        power = db_to_linear(prm.tx_power_db)
        sym_power = s.abs().pow(2).mean(dim=2)  # (n, blocks)
        need = (weights**2) * sym_power / h.abs().pow(2).clamp_min(1e-30)  # power to send w s / h at eta = 1
        eta = torch.where(active & (need > 0), power / need.clamp_min(1e-30), torch.full_like(need, float("inf")))
        eta = eta.min(dim=0).values  # (blocks,)
        eta = torch.where(torch.isfinite(eta), eta, torch.ones_like(eta))
        superposed = (active.unsqueeze(2) * weights.view(n, 1, 1) * s).sum(dim=0) * eta.sqrt().view(blocks, 1)
        snr = db_to_linear(prm.snr_db)
        if math.isfinite(snr):
            superposed = superposed + math.sqrt(power / snr) * complex_noise(tuple(superposed.shape), self.generator)
        active_weight = (active * weights).sum(dim=0)  # (blocks,)
        scale = (eta.sqrt() * active_weight).view(blocks, 1)
        estimate = torch.where(scale > 0, superposed / scale.clamp_min(1e-30), torch.zeros_like(superposed))
        received = from_symbols(estimate.reshape(1, -1)[:, :m], d)
        target = (weights * batch).sum(dim=0, keepdim=True)
        mse = (received - target).pow(2).mean()
        report = ChannelReport(
            mse=mse.repeat(n), snr_db=(10 * torch.log10(target.pow(2).mean() / mse.clamp_min(1e-30))).repeat(n)
            if mse > 0 else torch.full((n,), float("inf")),
            bits=torch.full((n,), 32.0 * d), dropped=torch.zeros(n, dtype=torch.bool),
            symbols=torch.full((n,), float(m)), aggregated=True,
            extra={"truncated_fraction": float((~active).float().mean())},
        )
        return received, report
