"""Byzantine-robust selection: Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018).

Each client's score is the sum of squared distances to its n - f - 2 nearest other updates (f: the
number of Byzantine clients the rule is built to tolerate); Byzantine updates that sit far from
the honest crowd score high.

- ``krum``: the one update with the lowest score.
- ``multikrum``: the example-weighted mean of the ``m`` lowest-scoring updates (default n - f).
- ``bulyan``: Multi-Krum selects theta = n - 2f updates; per coordinate, the mean of the
  beta = theta - 2f selected values closest to their median. Needs n >= 4f + 3 updates; a round
  with fewer keeps the model (as Flower's Bulyan skips it).

Semantics are those of Flower's ``Krum``, ``MultiKrum`` and ``Bulyan`` strategies (flwr 1.42), which
the tests use as oracles; distances between deltas equal distances between the client models.
"""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeInt, PositiveInt

from .base import FUSION_RULES, FusionRule, InsufficientUpdates, RuleParams, by_column_blocks, weighted_mean


def krum_scores(deltas: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of squared L2 distances from each row to its n - f - 2 nearest other rows."""
    n = deltas.shape[0]
    rows = deltas.double()
    norms = rows.pow(2).sum(dim=1)
    distances = norms[:, None] + norms[None, :] - 2 * rows @ rows.T
    nearest = max(1, n - f - 2)
    return distances.sort(dim=1).values[:, 1:nearest + 1].sum(dim=1)


def multikrum_indices(deltas: torch.Tensor, f: int, m: int) -> torch.Tensor:
    return torch.argsort(krum_scores(deltas, f))[:m]


class KrumParams(RuleParams):
    f: NonNegativeInt = Field(0, description="Byzantine clients to tolerate")


@FUSION_RULES.register("krum")
class Krum(FusionRule):
    Params = KrumParams

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return deltas[multikrum_indices(deltas, self.params.f, 1)[0]].clone()


class MultiKrumParams(KrumParams):
    m: PositiveInt | None = Field(None, description="updates averaged (default n - f)")


@FUSION_RULES.register("multikrum")
class MultiKrum(FusionRule):
    Params = MultiKrumParams

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = deltas.shape[0], self.params.f
        chosen = multikrum_indices(deltas, f, min(n, self.params.m or max(1, n - f)))
        return weighted_mean(deltas[chosen], weights[chosen])


@FUSION_RULES.register("bulyan")
class Bulyan(FusionRule):
    Params = KrumParams

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, f = deltas.shape[0], self.params.f
        if n < 4 * f + 3:
            raise InsufficientUpdates(f"bulyan with f={f} needs at least {4 * f + 3} updates, got {n}")
        theta = n - 2 * f
        beta = theta - 2 * f
        selected = deltas[multikrum_indices(deltas, f, theta)]

        def closest_to_median(block: torch.Tensor) -> torch.Tensor:
            median = block.median(dim=0).values if theta % 2 else block.sort(dim=0).values[theta // 2 - 1:theta // 2 + 1].mean(0)
            order = (block - median).abs().argsort(dim=0)[:beta]
            return block.gather(0, order).mean(dim=0)

        return by_column_blocks(selected, closest_to_median)
