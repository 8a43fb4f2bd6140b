"""Digital uplink: optional top-k sparsification, then stochastic uniform quantisation to ``bits``.

Quantisation: each client's kept values are mapped onto 2^bits levels spanning [min, max] and
rounded up or down at random with the probabilities that make it unbiased (E[q(x)] = x); the
per-value variance is at most Delta^2 / 4 with Delta = (max - min) / (2^bits - 1). Top-k keeps
about the ``topk`` fraction of largest-magnitude values (biased: the rest are zero; see
:func:`topk_mask`). Bits counted per client: values x bits + 64 for (min, max), plus an index of
ceil(log2 d) bits per kept value when sparsified.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from .base import CHANNELS, Channel, ChannelParams, ChannelReport, ClientMeta, check_batch, measured_report


class QuantizeParams(ChannelParams):
    # at most 24: float32 has a 24-bit significand, so finer levels would be rounded away by the
    # arithmetic itself and the stochastic rounding would no longer be unbiased
    bits: int = Field(8, ge=1, le=24, description="bits per value")
    topk: float = Field(1.0, gt=0.0, le=1.0, description="fraction of values kept (1.0: dense)")
    topk_exact: bool = Field(False, description="exact k-th magnitude threshold instead of a sampled estimate")


def topk_mask(batch: torch.Tensor, frac: float, exact: bool, generator: torch.Generator) -> torch.Tensor:
    """Mask of each row's largest-magnitude ``frac`` of values.

    The threshold is the k-th largest magnitude (``exact``), or, as in Deep Gradient Compression
    (Lin et al. 2018), that quantile of a seeded sample of 100k magnitudes: about k values are
    kept (ties and sampling error move the count slightly; the bits count the actual ones) at a
    fraction of the cost of a full selection on multi-million-value payloads.
    """
    mags = batch.abs()
    n, d = batch.shape
    k = max(1, int(round(frac * d)))
    if exact or d <= 100_000:
        threshold = mags.kthvalue(d - k + 1, dim=1, keepdim=True).values
    else:
        sample = mags[:, torch.randint(0, d, (100_000,), generator=generator)]
        threshold = sample.quantile(1 - frac, dim=1, keepdim=True)
    return mags >= threshold


def stochastic_quantize(x: torch.Tensor, bits: int, generator: torch.Generator) -> torch.Tensor:
    """Unbiased stochastic rounding of each row of ``x`` onto 2^bits uniform levels of its range."""
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    levels = 2**bits - 1
    step = ((hi - lo) / levels).clamp_min(1e-30)
    # floor(t + U), U ~ Uniform[0, 1), rounds t up with probability frac(t): unbiased.
    q = (x - lo).div_(step).add_(torch.rand(x.shape, generator=generator)).floor_().mul_(step).add_(lo)
    return torch.where(hi > lo, q, x)


@CHANNELS.register("quantize")
class QuantizeChannel(Channel):
    Params = QuantizeParams
    independent = True

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        n, d = batch.shape
        bits, frac = self.params.bits, self.params.topk
        if frac < 1.0:
            mask = topk_mask(batch, frac, self.params.topk_exact, self.generator)
            received = torch.zeros_like(batch)
            for row in range(n):  # a handful of clients; each row keeps its own count
                kept = batch[row][mask[row]]
                received[row][mask[row]] = stochastic_quantize(kept.unsqueeze(0), bits, self.generator)[0]
            counts = mask.sum(dim=1).to(torch.float64)
            bits_sent = counts * (bits + math.ceil(math.log2(max(d, 2)))) + 64
        else:
            received = stochastic_quantize(batch, bits, self.generator)
            bits_sent = torch.full((n,), float(d * bits + 64))
        return received, measured_report(batch, received, bits_sent)
