"""The fusion-rule interface: ``(clients x d) deltas, (clients,) weights -> (d,) fused delta``.

A rule is a class with a ``Params`` model (its YAML keys under ``strategy:``) and ``__call__``;
the server applies ``global += server_lr * fused`` (for task arithmetic, server_lr is lambda).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from fedllm.registry import Registry, validate_params


class RuleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FusionRule:
    Params: ClassVar[type[RuleParams]] = RuleParams

    def __init__(self, params: RuleParams | None = None, seed: int = 0) -> None:
        self.params = params or self.Params()
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        check_inputs(deltas, weights)
        return self.fuse(deltas, weights)

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def check_inputs(deltas: torch.Tensor, weights: torch.Tensor) -> None:
    if deltas.ndim != 2 or weights.shape != (deltas.shape[0],):
        raise ValueError(f"fusion needs deltas (clients x d) and weights (clients,), got "
                         f"{tuple(deltas.shape)} and {tuple(weights.shape)}")
    if deltas.shape[0] == 0:
        raise ValueError("fusion needs at least one client delta")


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum()
    if total <= 0:
        raise ValueError("fusion needs a positive total weight (number of examples)")
    return (weights / total).to(deltas.dtype) @ deltas


def by_column_blocks(deltas: torch.Tensor, reduce, block: int = 1 << 16) -> torch.Tensor:
    """Apply a reduction over clients (dim 0) to column blocks and join the results. Reducing
    across the rows of a (clients x d) tensor walks memory with stride d; blocks of 64k columns
    stay in cache (median of 8 x 22.7M: 1.05 s instead of 1.52 s)."""
    if deltas.shape[1] <= block:
        return reduce(deltas)
    return torch.cat([reduce(b) for b in deltas.split(block, dim=1)])


FUSION_RULES: Registry[type[FusionRule]] = Registry("strategy")


def validate_rule_params(name: str, params: Mapping[str, Any]) -> RuleParams:
    return validate_params(FUSION_RULES.get(name).Params, params, "strategy", name)  # type: ignore[return-value]


def build_rule(name: str, params: Mapping[str, Any], seed: int = 0) -> FusionRule:
    return FUSION_RULES.get(name)(validate_rule_params(name, params), seed)
