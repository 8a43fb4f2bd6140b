"""Robust aggregation against corrupted or Byzantine updates.

- ``median``: coordinate-wise median (Yin et al. 2018), unweighted.
- ``trimmed_mean``: per coordinate, drop the ``trim_ratio`` largest and smallest values, average the rest.
- ``norm_clip``: scale every delta down to at most ``max_norm`` (or ``median_multiple`` x the
  median norm of the round when ``max_norm`` is unset), then the example-weighted mean.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveFloat

from .base import FUSION_RULES, FusionRule, RuleParams, by_column_blocks, weighted_mean


@FUSION_RULES.register("median")
class Median(FusionRule):
    bfloat16_stack = True

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = deltas.shape[0]

        def median(block: torch.Tensor) -> torch.Tensor:
            if n % 2:
                return block.median(dim=0).values
            ordered = block.sort(dim=0).values  # even count: the mean of the two middle values
            return (ordered[n // 2 - 1] + ordered[n // 2]) / 2

        return by_column_blocks(deltas, median)


class TrimmedMeanParams(RuleParams):
    trim_ratio: float = Field(0.2, ge=0.0, lt=0.5, description="fraction trimmed from each end")


@FUSION_RULES.register("trimmed_mean")
class TrimmedMean(FusionRule):
    Params = TrimmedMeanParams
    bfloat16_stack = True

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = deltas.shape[0]
        cut = int(self.params.trim_ratio * n)  # trim_ratio < 0.5 (validated): at least one row stays
        return by_column_blocks(deltas, lambda block: block.sort(dim=0).values[cut:n - cut].mean(dim=0))


class NormClipParams(RuleParams):
    max_norm: PositiveFloat | None = None
    median_multiple: PositiveFloat = 2.0


@FUSION_RULES.register("norm_clip")
class NormClip(FusionRule):
    Params = NormClipParams

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(deltas, dim=1)
        bound = self.params.max_norm or float(norms.median()) * self.params.median_multiple
        scale = (bound / norms.clamp_min(1e-12)).clamp(max=1.0)
        return weighted_mean(deltas * scale.unsqueeze(1), weights)
