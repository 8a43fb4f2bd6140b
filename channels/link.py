"""A point-to-point uplink shared by ``awgn``, ``rayleigh`` and ``rician``.

Each client's reals are packed in pairs into complex symbols and cut into packets of
``packet_size`` symbols. Power normalisation is per client and, by default, **per packet**:
every packet is scaled to the transmit power P (the receiver must know one scale factor per
packet, the usual analog-FL side information), so small-valued packets keep their relative
accuracy. With ``power_normalisation: payload`` one factor scales the client's whole payload,
so packets of small values (e.g. LoRA A deltas next to a head's) drown in noise set by the
payload's average power. Each packet sees one block-fading gain h and gets circular Gaussian
noise CN(0, sigma^2) with sigma^2 = P / SNR; ``snr_db`` is thus the SNR of a unit-gain link at
the 1 m reference distance, and fading and path loss lower the received SNR from there.
The receiver equalises with its channel estimate (perfect, or with error variance
``csi_error_var``) by zero-forcing or LMMSE and undoes the power scaling. A packet of zeros (a
full fine-tune's embedding rows of tokens no client saw) has no scale to undo: its side
information (power 0) tells the receiver, which puts zeros there, as the limit of ever smaller
packets would (their error shrinks with their power); it does not amplify the noise to unit power.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator

from .base import ChannelParams, ClientMeta, complex_noise, db_to_linear, packets


class LinkParams(ChannelParams):
    snr_db: float = Field(10.0, description="SNR (dB) of a unit-gain link; .inf for noiseless")
    packet_size: PositiveInt | None = Field(4096, description="symbols per packet (fading block)")
    power_normalisation: Literal["packet", "payload"] = Field(
        "packet", description="scale each packet, or the client's whole payload at once, to the transmit power")
    tx_power_db: float = 0.0
    path_loss_exponent: NonNegativeFloat = 0.0
    distance_m: float | tuple[float, float] = Field(
        1.0, description="client distance in metres, or [min, max] for a uniform drop per client")

    @field_validator("distance_m")
    @classmethod
    def _positive_distance(cls, value: float | tuple[float, float]) -> float | tuple[float, float]:
        values = value if isinstance(value, tuple) else (value,)
        if any(v <= 0 for v in values) or (isinstance(value, tuple) and value[0] > value[1]):
            raise ValueError(f"distance_m must be positive (and min <= max), got {value}")
        return value


class FadingParams(LinkParams):
    equalizer: Literal["zf", "mmse"] = "mmse"
    csi_error_var: NonNegativeFloat = Field(0.0, description="variance of the channel-estimate error (0: perfect CSI)")


def link_segment_values(params: LinkParams) -> int | None:
    """Whole packets (two reals a symbol) under per-packet power normalisation: a segment of them meets
    the link as they would in the whole payload. A payload-wide power scale needs the payload whole."""
    if params.packet_size is None or params.power_normalisation != "packet":
        return None
    return 2 * params.packet_size


def path_gains(params: LinkParams, ids: list[str], seed: int) -> torch.Tensor:
    """Large-scale gain beta = d^-exponent per client; a client keeps its distance across rounds."""
    if isinstance(params.distance_m, tuple):
        lo, hi = params.distance_m
        dist = []
        for cid in ids:
            u = int(hashlib.sha256(f"{seed}-{cid}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            dist.append(lo + (hi - lo) * u)
        d = torch.tensor(dist, dtype=torch.float64)
    else:
        d = torch.full((len(ids),), float(params.distance_m), dtype=torch.float64)
    return d.pow(-params.path_loss_exponent).to(torch.float32)


def transmit_link(symbols: torch.Tensor, params: LinkParams, meta: ClientMeta, generator: torch.Generator,
                  seed: int, gains: torch.Tensor | None = None, equalizer: str = "zf",
                  csi_error_var: float = 0.0) -> torch.Tensor:
    """Send (n, m) complex symbols through per-packet gains ``gains`` (n, blocks); returns estimates.

    Per packet, with u = alpha s sent, y = g u + sigma z received and equaliser weight w, the
    estimate is s_hat = w y / alpha = (w g) s + (w sigma / alpha) z: two per-packet complex
    coefficients, so the payload is touched in a few fused passes however the link is set up.
    """
    n, m = symbols.shape
    blocks, size = packets(m, params.packet_size)
    tx_power = db_to_linear(params.tx_power_db)
    power = tx_power * meta.power().to(torch.float32).view(n, 1)
    beta = path_gains(params, meta.ids, seed).view(n, 1)
    h = gains.view(n, blocks) if gains is not None else torch.ones(n, blocks, dtype=torch.complex64)
    g = torch.sqrt(beta) * h
    snr = db_to_linear(params.snr_db)
    sigma2 = tx_power / snr if math.isfinite(snr) else 0.0
    g_hat = g
    if csi_error_var > 0:
        g_hat = g + torch.sqrt(beta * csi_error_var) * complex_noise((n, blocks), generator)
    if equalizer == "zf":
        w = 1 / g_hat
    else:  # LMMSE: P g* / (P |g|^2 + sigma^2 + P beta csi_var)
        w = power * g_hat.conj() / (power * g_hat.abs().pow(2) + sigma2 + power * beta * csi_error_var)
    full = (m // size) * size
    out = torch.empty_like(symbols)
    payload_power = torch.linalg.vector_norm(torch.view_as_real(symbols), dim=(1, 2)).pow(2).view(n, 1) / max(m, 1)
    for lo, hi in ((0, full), (full, m)):
        if hi <= lo:
            continue
        k = (hi - lo) // size if hi - lo >= size else 1
        part = symbols[:, lo:hi].reshape(n, k, -1)
        b = slice(lo // size, lo // size + k)
        packet_power = part.abs().pow(2).mean(dim=2) if params.power_normalisation == "packet" else payload_power
        alpha = torch.where(packet_power > 0, torch.sqrt(power / packet_power.clamp_min(1e-30)),
                            torch.ones_like(packet_power))
        signal_coef = (w[:, b] * g[:, b]).unsqueeze(2)
        est = out[:, lo:hi].view(n, k, -1)  # written in place: no batch-sized temporary besides the noise
        torch.mul(part, signal_coef, out=est)
        if sigma2 > 0:
            silent = torch.where(packet_power > 0, 1 / alpha, torch.zeros_like(alpha))  # 0: a packet of zeros
            noise_coef = (w[:, b] * math.sqrt(sigma2) * silent).unsqueeze(2)
            est.add_(complex_noise(tuple(part.shape), generator).mul_(noise_coef))
    return out
