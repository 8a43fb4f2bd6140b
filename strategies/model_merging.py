"""Model-merging rules beyond task arithmetic, on task vectors (one client = one task).

- ``weighted_average``: sum_t w_t tau_t with given weights per client (in client-id order), normalised
  to sum 1 unless ``normalize: false`` (FusionBench's weighted_average; equal weights: simple average).
- ``breadcrumbs`` (Davari & Belilovsky 2024, "Model Breadcrumbs"): in each task vector, drop the
  ``gamma`` fraction of largest magnitudes (outliers) and keep the next ``density`` fraction (the
  smallest are dropped too), then sum like task arithmetic (lambda = ``strategy.server_lr``).
- ``fisher`` (Matena & Raffel 2022): the Fisher-weighted average theta = sum_t F_t theta_t / sum_t F_t
  with each client's diagonal Fisher F_t of its own data, sent with its task vector; as
  FusionBench's ``merging_with_fisher_weights`` (each F_t + ``min_weight``, and with ``normalize``
  the clients weighted by 1 / ||F_t||, normalised).
- ``regmean`` (Jin et al. 2023): per linear layer, the weights that minimise the summed regression
  error on every client's inputs, W = (sum_t G_t)^-1 sum_t G_t W_t with G_t = X_t^T X_t the Gram
  matrix of the layer's inputs on client t's data (sent with the task vector; off-diagonal entries
  scaled by ``reduce_non_diagonal_ratio``); other tensors are averaged, as in FusionBench's
  ``merging_with_regmean_weights``.

On task vectors tau_t = theta_t - theta0 each of these is the same merge as on the models
(the weights of a weighted average sum to one), so the server adds the fused delta to theta0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, PositiveInt

from fedllm.core.modules import sent_linear_layers
from fedllm.core.vectors import Layout, unflatten

from .base import FUSION_RULES, STATISTIC_LAYOUTS, FusionRule, FusionSpace, RuleParams, per_sent_value

if TYPE_CHECKING:
    from fedllm.core.bundle import ModelBundle


class WeightedAverageParams(RuleParams):
    weights: list[float] = Field(..., min_length=1, description="one weight per client, in client-id order")
    normalize: bool = True


@FUSION_RULES.register("weighted_average")
class WeightedAverage(FusionRule):
    Params = WeightedAverageParams

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        given = torch.tensor(self.params.weights, dtype=deltas.dtype)
        if len(given) != deltas.shape[0]:
            raise ValueError(f"strategy.weights has {len(given)} weights for {deltas.shape[0]} client updates "
                             "(one per client, in client-id order)")
        if self.params.normalize:
            given = given / given.sum()
        return given @ deltas


class BreadcrumbsParams(RuleParams):
    density: float = Field(0.9, gt=0.0, le=1.0, description="fraction of each task vector's entries kept")
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of largest magnitudes dropped")


def magnitude_band(deltas: torch.Tensor, gamma: float, density: float) -> torch.Tensor:
    """Each row with only its entries ranked (by magnitude, largest first) in [gamma d, (gamma + density) d)."""
    d = deltas.shape[1]
    top_drop = int(round(gamma * d))
    keep = int(round(density * d))  # the slice below stops at d by itself
    order = deltas.abs().argsort(dim=1, descending=True)
    mask = torch.zeros_like(deltas, dtype=torch.bool)
    mask.scatter_(1, order[:, top_drop:top_drop + keep], True)
    return deltas * mask


@FUSION_RULES.register("breadcrumbs")
class Breadcrumbs(FusionRule):
    Params = BreadcrumbsParams

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return magnitude_band(deltas, self.params.gamma, self.params.density).sum(dim=0)


class FisherParams(RuleParams):
    examples: PositiveInt = Field(64, description="examples each client estimates its Fisher on")
    normalize: bool = True
    min_weight: float = Field(1e-6, gt=0.0)


STATISTIC_LAYOUTS.register("fisher")(per_sent_value)


@STATISTIC_LAYOUTS.register("gram")
def input_gram_layout(bundle: "ModelBundle", sent: Layout) -> Layout:
    """One (inputs x inputs) matrix per sent linear layer."""
    layers = sent_linear_layers(bundle.model, bundle.groups.global_names)
    return Layout(tuple(layers), tuple((m.in_features, m.in_features) for m in layers.values()))


@FUSION_RULES.register("fisher")
class FisherMerging(FusionRule):
    Params = FisherParams

    def client_statistics(self) -> dict[str, dict[str, Any]]:
        return {"fisher": {"examples": self.params.examples}}

    def fuse_with(self, deltas: torch.Tensor, weights: torch.Tensor, stats: dict[str, torch.Tensor],
                  space: FusionSpace) -> torch.Tensor:
        fisher = stats["fisher"].clamp_min(0) + self.params.min_weight  # a noisy uplink can make it negative
        scale = torch.ones(deltas.shape[0], dtype=deltas.dtype)
        if self.params.normalize:
            inverse = 1.0 / (torch.linalg.vector_norm(fisher - self.params.min_weight, dim=1) + self.params.min_weight)
            scale = inverse / inverse.sum()
        weighted = scale[:, None] * fisher
        return (weighted * deltas).sum(dim=0) / weighted.sum(dim=0)


class RegMeanParams(RuleParams):
    examples: PositiveInt = Field(256, description="examples each client computes its Gram matrices on")
    reduce_non_diagonal_ratio: float = Field(1.0, ge=0.0, le=1.0, description="scale of the Gram matrices' "
                                             "off-diagonal entries (1: plain RegMean)")


@FUSION_RULES.register("regmean")
class RegMean(FusionRule):
    Params = RegMeanParams

    def client_statistics(self) -> dict[str, dict[str, Any]]:
        return {"gram": {"examples": self.params.examples}}

    def fuse_with(self, deltas: torch.Tensor, weights: torch.Tensor, stats: dict[str, torch.Tensor],
                  space: FusionSpace) -> torch.Tensor:
        rows = [unflatten(row, space.layout) for row in deltas]
        grams = [unflatten(row, space.statistics["gram"]) for row in stats["gram"]]
        ratio = self.params.reduce_non_diagonal_ratio
        fused = {}
        for name in space.layout.names:
            if name not in grams[0]:  # not a linear layer's weight: averaged
                fused[name] = torch.stack([r[name] for r in rows]).mean(dim=0)
                continue
            g = [gram[name].double() for gram in grams]
            if ratio != 1.0:
                off = torch.full_like(g[0], ratio).fill_diagonal_(1.0)
                g = [x * off for x in g]
            total = sum(g)
            weighted = sum(gi @ r[name].double().T for gi, r in zip(g, rows))  # (in, in) @ (in, out)
            fused[name] = torch.linalg.solve(total, weighted).T.to(deltas.dtype)
        return torch.cat([fused[n].reshape(-1) for n in space.layout.names])
