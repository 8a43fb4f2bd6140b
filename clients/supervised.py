"""Supervised PEFT fine-tuning: local epochs of AdamW (or SGD) on the client's labelled examples.

The loop (:func:`supervised_steps`) takes the optimiser and a hook run between backward and step, so
a trainer that corrects gradients (SCAFFOLD, fedllm/clients/scaffold.py) reuses it."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedllm.core.bundle import ModelBundle, forward_logits
from fedllm.core.types import Examples

from .base import TRAINERS, LocalTraining, TrainContext, TrainResult, proximal_term


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def local_optimizer(bundle: ModelBundle, section: LocalTraining) -> torch.optim.Optimizer:
    """``client.optimizer`` over the trainable parameters, with ``client.lr`` and ``client.weight_decay``."""
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    return OPTIMIZERS[section.optimizer](params, lr=section.lr, weight_decay=section.weight_decay)


@TRAINERS.register("supervised")
def train_supervised(bundle: ModelBundle, examples: Examples, ctx: TrainContext) -> TrainResult:
    return supervised_steps(bundle, examples, ctx, local_optimizer(bundle, ctx.section))


def supervised_steps(bundle: ModelBundle, examples: Examples, ctx: TrainContext, optimizer: torch.optim.Optimizer,
                     after_backward: Callable[[], None] | None = None) -> TrainResult:
    section = ctx.section
    model = bundle.model
    rng = random.Random(ctx.seed)
    torch.manual_seed(ctx.seed)  # dropout masks
    model.train()
    losses: list[float] = []
    seen = 0
    for _epoch in range(section.local_epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), section.batch_size):
            if section.max_steps is not None and len(losses) >= section.max_steps:
                break
            batch = [order[i] for i in range(start, min(start + section.batch_size, len(order)))]
            logits = forward_logits(bundle, model, [examples.texts[i] for i in batch],
                                    [examples.tasks[i] for i in batch], ctx.label_ranges, ctx.max_length)
            labels = torch.tensor([examples.labels[i] for i in batch], device=logits.device)
            loss = F.cross_entropy(logits, labels)
            if ctx.anchor is not None:
                loss = loss + proximal_term(model, ctx.anchor, section.prox_mu)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            seen += len(batch)
    model.eval()
    return TrainResult(loss=sum(losses) / max(1, len(losses)), steps=len(losses), examples_seen=seen)
