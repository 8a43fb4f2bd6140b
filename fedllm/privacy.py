"""Central (user-level) differential privacy for federated averaging: DP-FedAvg.

Following McMahan et al. (ICLR 2018): the server clips every client update to L2 norm C,
averages them uniformly and adds Gaussian noise N(0, (sigma C / n)^2) per coordinate. Adding or
removing one client changes the clipped sum by at most C, so each round is a Gaussian mechanism
with noise multiplier sigma. The privacy spent over T rounds is accounted with Renyi DP:
eps_RDP(alpha) = T alpha / (2 sigma^2), converted to (eps, delta)-DP by
eps = min_alpha eps_RDP(alpha) + log(1/delta) / (alpha - 1). Sub-sampling amplification is not
counted, so the reported epsilon is an upper bound.
"""

from __future__ import annotations

import math

import torch


def clip_rows(deltas: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row down to L2 norm at most ``clip_norm``."""
    norms = torch.linalg.vector_norm(deltas, dim=1, keepdim=True)
    return deltas * (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)


def dp_mean(deltas: torch.Tensor, clip_norm: float, noise_multiplier: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform mean of the clipped updates plus Gaussian noise of std noise_multiplier * clip_norm / n."""
    n = deltas.shape[0]
    mean = clip_rows(deltas, clip_norm).mean(dim=0)
    if noise_multiplier == 0:
        return mean
    return mean + torch.randn(mean.shape, generator=generator) * (noise_multiplier * clip_norm / n)


def gaussian_epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """(eps, delta) after ``rounds`` Gaussian mechanisms of the given noise multiplier (RDP accountant)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 257))
    return min(rounds * a / (2 * noise_multiplier**2) + math.log(1 / delta) / (a - 1) for a in orders)
