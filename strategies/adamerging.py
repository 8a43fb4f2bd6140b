"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learnt on the server.

theta = theta0 + sum_t lambda_t tau_t (task-wise: one coefficient per task vector) or
theta = theta0 + sum_t lambda_{t,l} tau_{t,l} (layer-wise: one per task vector and tensor), with the
coefficients trained by Adam to minimise the entropy of the merged model's predictions on unlabelled
inputs the server holds (``objective: entropy``, the paper's), or its loss on the few labelled shots
R-MTLLMF already uses (``objective: labelled``); they start at ``init`` (task arithmetic's 0.3) and
stay in [0, 1]. Under a jammed uplink the layer-wise coefficients can turn down exactly the tensors
the noise hit; the round's record keeps each tensor's mean coefficient so a reader sees which.
The coefficients replace task arithmetic's lambda, so ``strategy.server_lr`` stays at 1.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from fedllm.core.vectors import Layout, Tensors, unflatten

from .base import FUSION_RULES, FusionRule, MergeContext, RuleParams


class AdaMergingParams(RuleParams):
    granularity: Literal["task", "layer"] = "layer"
    objective: Literal["entropy", "labelled"] = "entropy"
    examples: PositiveInt = Field(16, description="server-held inputs per task the coefficients are learnt on")
    steps: PositiveInt = Field(50, description="Adam steps on the coefficients")
    lr: float = Field(1e-3, gt=0.0)
    init: float = Field(0.3, ge=0.0, le=1.0, description="starting coefficient (task arithmetic's lambda)")


class MergedView(nn.Module):
    """The server's model with some tensors replaced (differentiably) by given ones."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.tensors = model, tensors

    def forward(self, **inputs: torch.Tensor) -> Any:
        return torch.func.functional_call(self.model, self.tensors, args=(), kwargs=inputs, strict=False)


def learn_coefficients(rows: torch.Tensor, layout: Layout, ctx: MergeContext, prm: AdaMergingParams
                       ) -> tuple[Tensors, dict[str, Any]]:
    """The merged tensors theta0 + sum lambda tau with learnt coefficients, and the round's record of them."""
    taus = [unflatten(row, layout) for row in rows]
    names = list(layout.names)
    groups = len(names) if prm.granularity == "layer" else 1
    coeffs = torch.full((len(taus), groups), prm.init, requires_grad=True)
    device = next(ctx.bundle.model.parameters()).device
    base = {n: ctx.before[n].to(device) for n in names}
    taus = [{n: t[n].to(device) for n in names} for t in taus]

    def merged(c: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: base[n] + sum(c[t, i if groups > 1 else 0] * taus[t][n] for t in range(len(taus)))
                for i, n in enumerate(names)}

    data = ctx.few_shot(prm.examples)
    objective = ctx.entropy if prm.objective == "entropy" else ctx.loss
    optimizer = torch.optim.Adam([coeffs], lr=prm.lr)
    torch.manual_seed(ctx.seed)
    ctx.bundle.model.eval()
    values = []
    for _ in range(prm.steps):
        value = objective(data, MergedView(ctx.bundle.model, merged(coeffs)))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        with torch.no_grad():
            coeffs.clamp_(0.0, 1.0)
        values.append(value.item())
    with torch.no_grad():
        final = {n: t.detach().cpu() for n, t in merged(coeffs).items()}
        after = float(objective(data, MergedView(ctx.bundle.model, {n: t.to(device) for n, t in final.items()})))
    c = coeffs.detach()
    record = {f"adamerging_{prm.objective}_before": values[0] if values else after,
              f"adamerging_{prm.objective}_after": after,
              "adamerging_coefficients": ({n: float(c[:, i].mean()) for i, n in enumerate(names)} if groups > 1
                                          else [float(x) for x in c[:, 0]])}
    return final, record


@FUSION_RULES.register("adamerging")
class AdaMerging(FusionRule):
    Params = AdaMergingParams
    needs_labelled_shots = True  # it learns on inputs the server holds (the workload's validation split)

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self._rows = deltas.clone()  # the post-merge hook learns how much of each to keep
        return self.params.init * deltas.sum(dim=0)

    def post_merge(self, merged: Tensors, ctx: MergeContext) -> tuple[Tensors, dict[str, float]]:
        rows = getattr(self, "_rows", None)
        if rows is None:  # nothing arrived this round
            return merged, {}
        self._rows = None
        learnt, record = learn_coefficients(rows, ctx.space.layout, ctx, self.params)
        return {**merged, **learnt}, record
