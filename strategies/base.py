"""The fusion-rule interface: ``(clients x d) deltas, (clients,) weights -> (d,) fused delta``."""

from __future__ import annotations

from typing import Protocol

import torch

from fedllm.registry import Registry


class FusionRule(Protocol):
    def __call__(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


FUSION_RULES: Registry[FusionRule] = Registry("strategy")
