"""FedAvg (McMahan et al. 2017): the example-weighted mean of the client deltas."""

from __future__ import annotations

import torch

from strategies.base import FUSION_RULES, FusionRule, weighted_mean


@FUSION_RULES.register("fedavg")
class FedAvg(FusionRule):
    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(deltas, weights)
