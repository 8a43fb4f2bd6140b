"""Model-merging rules on task vectors (one client = one task).

- ``task_arithmetic`` (Ilharco et al. 2023): the sum of the task vectors; the server scales it by
  lambda (``strategy.server_lr``, ``auto`` picks it on the validation split).
- ``ties`` (Yadav et al. 2023): trim each vector to its top ``k`` fraction of magnitudes, elect a
  sign per coordinate (sign of the summed trimmed values), average the values that agree with it.
- ``dare`` (Yu et al. 2024): drop each value with probability ``p`` and rescale the survivors by
  1 / (1 - p), which keeps every vector's expectation, then sum.
- ``rmtllmf`` (Djuhera et al. 2024): task arithmetic plus few-shot realignment on the server
  (:mod:`.realign`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedllm.core.bundle import ModelBundle
from fedllm.core.errors import ConfigError
from fedllm.core.vectors import Tensors

from .adamerging import AdaMergingParams, learn_coefficients
from .base import FUSION_RULES, FusionRule, MergeContext, RuleParams, by_column_blocks, column_sum
from .realign import realign, realign_parameters


@FUSION_RULES.register("task_arithmetic")
class TaskArithmetic(FusionRule):
    running_sum = "sum"
    bfloat16_stack = True

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return column_sum(deltas)


class TiesParams(RuleParams):
    k: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector's entries kept")


def top_k_thresholds(deltas: torch.Tensor, k: float, group_bytes: int = 1 << 29) -> torch.Tensor:
    """Per row, the smallest of its ``k`` fraction of largest magnitudes (entries at or above it are
    kept). A few rows at a time: the magnitudes of the whole stack would be one more stack-sized copy
    (4.3 GB for 8 SmolLM2 task vectors), while topk over one row uses one thread; so as many rows as
    there are threads, within ``group_bytes`` (8 x 22.7M: 2.0 s in pairs, 3.3 s row by row, 1.4 s
    all at once with 2.6 GB more memory)."""
    n, d = deltas.shape
    keep = max(1, int(round(k * d)))
    if keep >= d:
        return deltas.new_zeros(n, 1)
    rows = max(1, min(torch.get_num_threads(), group_bytes // max(1, d * deltas.element_size())))
    return torch.cat([group.abs().topk(keep, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
                      for group in deltas.split(rows)])


@FUSION_RULES.register("ties")
class Ties(FusionRule):
    Params = TiesParams
    CHUNK = 1 << 16  # columns per block: the trim, the sign election and the mean are per coordinate

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        thresholds = top_k_thresholds(deltas, self.params.k)

        def disjoint_mean(block: torch.Tensor) -> torch.Tensor:
            trimmed = block * (block.abs() >= thresholds)
            sign = trimmed.sum(dim=0).sign_()  # elected sign per coordinate
            agree = (trimmed * sign) > 0  # kept and of the elected sign
            return torch.where(agree, trimmed, 0.0).sum(dim=0) / agree.sum(dim=0).clamp_min_(1)

        return by_column_blocks(deltas, disjoint_mean, self.CHUNK)


class DareParams(RuleParams):
    p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability")


@FUSION_RULES.register("dare")
class Dare(FusionRule):
    Params = DareParams

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        p = self.params.p
        keep = torch.rand(deltas.shape, generator=self.generator) >= p
        return (deltas * keep).sum(dim=0) / (1 - p)


class RMTLLMFParams(RuleParams):
    shots: int = Field(5, ge=1, description="labelled examples per task for realignment")
    realign_steps: int = Field(20, ge=0)
    realign_lr: float = Field(1e-4, gt=0.0)
    realign_scope: Literal["transmitted", "norms_biases"] = "norms_biases"
    # Before realigning: learn AdaMerging coefficients per task or per task and tensor (fedllm/strategies/
    # adamerging.py) on the same server-held inputs, instead of one lambda for all.
    coefficients: Literal["none", "task", "layer"] = "none"
    coefficient_objective: Literal["entropy", "labelled"] = "entropy"
    coefficient_steps: int = Field(50, ge=1)


@FUSION_RULES.register("rmtllmf")
class RMTLLMF(TaskArithmetic):
    """R-MTLLMF (Djuhera et al. 2024): task arithmetic of task vectors fine-tuned with the sensitive
    embedding layers frozen (``peft.frozen_patterns``, so they are never sent), followed by a
    few-shot realignment of the merged model on the server's labelled shots (its post-merge hook)."""

    Params = RMTLLMFParams
    needs_labelled_shots = True
    needs_frozen_layers = True

    def check(self, bundle: ModelBundle) -> None:
        if self.params.realign_steps > 0 and not realign_parameters(bundle, self.params.realign_scope):
            raise ConfigError(f"strategy.realign_scope {self.params.realign_scope!r} selects no transmitted tensor to "
                              "realign (with LoRA there are no LayerNorms or biases in the sent group); use "
                              "realign_scope: transmitted or realign_steps: 0")

    def fuse(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.params.coefficients != "none":
            self._rows = deltas.clone()  # the hook learns how much of each to keep
        return super().fuse(deltas, weights)

    def post_merge(self, merged: Tensors, ctx: MergeContext) -> tuple[Tensors, dict[str, float]]:
        prm = self.params
        record: dict = {}
        rows = getattr(self, "_rows", None)
        if prm.coefficients != "none" and rows is not None:
            self._rows = None
            learnt, record = learn_coefficients(rows, ctx.space.layout, ctx, AdaMergingParams(
                granularity=prm.coefficients, objective=prm.coefficient_objective, examples=prm.shots,
                steps=prm.coefficient_steps))
            merged = {**merged, **learnt}
        if prm.realign_steps == 0:
            return merged, record
        ctx.load(merged)
        shots = ctx.few_shot(prm.shots)
        before, after = realign(ctx.bundle.model, realign_parameters(ctx.bundle, prm.realign_scope),
                                lambda: ctx.loss(shots), steps=prm.realign_steps, lr=prm.realign_lr, seed=ctx.seed)
        return {**merged, **ctx.read_back()}, {**record, "realign_loss_before": before, "realign_loss_after": after}
