"""Central (user-level) differential privacy for federated averaging: DP-FedAvg.

Following McMahan et al. (ICLR 2018): the server clips every received update to L2 norm C before
anything else looks at the updates, sums them, divides by the *expected* cohort m = q N (fixed: not
the number that arrived, so no client's presence changes the scale) and adds Gaussian noise
N(0, (sigma C / m)^2) per coordinate. Adding or removing one client changes the clipped sum by at
most C, so each round is a Gaussian mechanism with noise multiplier sigma applied to a Poisson
sample of rate q = ``strategy.fraction_train`` (``strategy.sampling: poisson``; with q = 1 every
client takes part and there is no amplification). Under DP the server's norm-outlier filter is
off (fedllm/apps/payload.py): it compares clients with each other, so one client's update could
decide whether others are used, and the one-client bound would no longer hold.

The privacy spent is accounted with Renyi DP by Google's ``dp-accounting`` (the backend of
Flower's own accountant), with the sub-sampling amplification of the Poisson-sampled Gaussian;
tests check it against opacus's independent implementation.
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
    """An averaging rule made private: clip every row to ``clip_norm``, take the inner rule's mean with
    uniform weights (each client counts once: the sensitivity is per client, not per example),
    rescale it to the fixed denominator ``expected_cohort`` and add Gaussian noise of std
    ``noise_multiplier * clip_norm / expected_cohort``."""

    averaging = True

    def __init__(self, inner: FusionRule, clip_norm: float, noise_multiplier: float, seed: int) -> None:
        super().__init__(inner.params, seed)
        if not inner.averaging:
            raise ValueError(f"differential privacy wraps an averaging rule, not {type(inner).__name__}")
        self.inner, self.clip_norm, self.noise_multiplier = inner, clip_norm, noise_multiplier
        self.expected_cohort: float | None = None  # q N, set by the server each round; None: the rows' count

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = deltas.shape[0]
        return self.private_mean(self.inner(clip_rows(deltas, self.clip_norm), torch.ones(n)) * n, n)

    def private_mean(self, clipped_sum: torch.Tensor, n: int) -> torch.Tensor:
        """The sum of ``n`` clipped updates, noised and divided by the fixed denominator: what the
        round releases. The stacked path and a running sum (clipping each reply as it arrives,
        fedllm/fusion/running_sum.py) both end here."""
        m = self.expected_cohort or n
        if self.noise_multiplier > 0:
            noise = torch.randn(clipped_sum.shape, generator=self.generator)
            clipped_sum = clipped_sum + noise * (self.noise_multiplier * self.clip_norm)
        return clipped_sum / m


class PrivacyLedger:
    """The epsilon spent by a run's DP rounds (RDP accountant of ``dp-accounting``)."""

    def __init__(self, noise_multiplier: float, delta: float, sampling_rate: float) -> None:
        self.noise_multiplier, self.delta, self.sampling_rate = noise_multiplier, delta, sampling_rate
        self.rounds = 0

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon at ``delta`` after ``rounds`` (default: the rounds spent so far)."""
        rounds = self.rounds if rounds is None else rounds
        if rounds == 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        from dp_accounting import dp_event, rdp

        accountant = rdp.RdpAccountant()  # add or remove one client
        event = dp_event.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate < 1.0:
            event = dp_event.PoissonSampledDpEvent(self.sampling_rate, event)
        accountant.compose(event, rounds)
        return float(accountant.get_epsilon(self.delta))

    def would_exceed(self, target: float) -> bool:
        """True when one more round would take the spent epsilon above ``target``."""
        return self.epsilon(self.rounds + 1) > target

    def spend(self) -> float:
        self.rounds += 1
        return self.epsilon()
