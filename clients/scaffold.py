"""SCAFFOLD's client step (Karimireddy et al., ICML 2020): SGD with a control-variate correction.

Each local step uses the gradient g - c_i + c, where c is the server's control variate (sent with the
global group) and c_i the client's own (kept in its state across rounds); after K steps of size eta
from x to y_i the client's control variate becomes (option II)
c_i+ = c_i - c + (x - y_i) / (K eta), and the client sends Delta c_i = c_i+ - c_i with its update.
The correction only touches the sent (global) tensors; the server's half is the ``scaffold`` rule.
"""

from __future__ import annotations

import torch

from fedllm.core.bundle import ModelBundle
from fedllm.core.types import Examples

from .base import TRAINERS, TrainContext, TrainResult
from .supervised import local_optimizer, supervised_steps

CONTROL = "control"


def control_update(c_i: dict[str, torch.Tensor], c: dict[str, torch.Tensor], x: dict[str, torch.Tensor],
                   y: dict[str, torch.Tensor], steps: int, lr: float) -> dict[str, torch.Tensor]:
    """c_i+ = c_i - c + (x - y) / (steps lr): SCAFFOLD's option II."""
    return {n: c_i[n] - c[n] + (x[n] - y[n]) / (max(1, steps) * lr) for n in x}


@TRAINERS.register("scaffold")
def train_scaffold(bundle: ModelBundle, examples: Examples, ctx: TrainContext) -> TrainResult:
    params = dict(bundle.model.named_parameters())
    names = list(bundle.groups.global_names)
    x = {n: params[n].detach().cpu().clone() for n in names}
    zeros = {n: torch.zeros_like(t) for n, t in x.items()}
    c = ctx.incoming.get(CONTROL) or zeros
    c_i = ctx.kept.get(CONTROL) or zeros
    correction = {n: (c[n] - c_i[n]).to(params[n].device) for n in names}

    def correct() -> None:
        for n in names:
            if params[n].grad is not None:
                params[n].grad.add_(correction[n])

    result = supervised_steps(bundle, examples, ctx, local_optimizer(bundle, ctx.section), correct)
    y = {n: params[n].detach().cpu() for n in names}
    new_c_i = control_update(c_i, c, x, y, result.steps, ctx.section.lr)
    result.statistics[CONTROL] = {n: new_c_i[n] - c_i[n] for n in names}
    result.keep[CONTROL] = new_c_i
    return result


train_scaffold.needs_rule = "scaffold"  # the server half (fedllm/strategies/scaffold.py)
train_scaffold.needs_optimizer = "sgd"  # the control-variate update (x - y) / (K lr) is SGD's
