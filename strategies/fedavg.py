"""FedAvg (McMahan et al. 2017): the example-weighted mean of the client deltas."""

from __future__ import annotations

import torch

from .base import FUSION_RULES, FusionRule, weighted_mean


@FUSION_RULES.register("fedavg")
class FedAvg(FusionRule):
    averaging = True
    running_sum = "mean"
    bfloat16_stack = True

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(deltas, weights)


@FUSION_RULES.register("personalized")
class Personalized(FedAvg):
    """PFTT (Jiang et al. 2024): FedAvg of the global group only; each client's local group
    (``peft.local_patterns``, e.g. a personal LoRA) never leaves it and persists across rounds.
    The fusion is FedAvg's; what differs is the run (a local group must exist, checked by the config)."""

    needs_local_part = True


@FUSION_RULES.register("local_only")
class LocalOnly(FusionRule):
    """No communication: every trainable tensor is local (``peft.global_patterns: []``), nothing
    is sent, the global group is empty; the baseline personalisation must beat."""

    sends_nothing = True

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.zeros(deltas.shape[1], dtype=deltas.dtype)
