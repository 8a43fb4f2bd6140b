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

from fedllm.strategies import FusionRule


def clip_rows(deltas: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row down to L2 norm at most ``clip_norm``."""
    norms = torch.linalg.vector_norm(deltas, dim=1, keepdim=True)
    return deltas * (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)


class DifferentiallyPrivate(FusionRule):
    """An averaging rule made private: clip every row to ``clip_norm``, fuse the clipped rows with
    uniform weights (each client counts once: the sensitivity argument is per client, not per
    example), add Gaussian noise of std ``noise_multiplier * clip_norm / n``."""

    averaging = True

    def __init__(self, inner: FusionRule, clip_norm: float, noise_multiplier: float, delta: float, seed: int) -> None:
        super().__init__(inner.params, seed)
        if not inner.averaging:
            raise ValueError(f"differential privacy wraps an averaging rule, not {type(inner).__name__}")
        self.inner, self.clip_norm, self.noise_multiplier, self.delta = inner, clip_norm, noise_multiplier, delta
        self.rounds = 0  # mechanisms run so far, for the accountant

    def epsilon(self) -> float:
        """The epsilon spent so far at ``delta``."""
        return gaussian_epsilon(self.rounds, self.noise_multiplier, self.delta)

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = deltas.shape[0]
        self.rounds += 1
        mean = self.inner(clip_rows(deltas, self.clip_norm), torch.ones(n))
        if self.noise_multiplier == 0:
            return mean
        return mean + torch.randn(mean.shape, generator=self.generator) * (self.noise_multiplier * self.clip_norm / n)


def gaussian_epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """(eps, delta) after ``rounds`` Gaussian mechanisms of the given noise multiplier (RDP accountant)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 257))
    return min(rounds * a / (2 * noise_multiplier**2) + math.log(1 / delta) / (a - 1) for a in orders)
