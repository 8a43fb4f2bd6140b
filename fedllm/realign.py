"""R-MTLLMF's few-shot realignment of a merged model on k labelled examples per task.

After the merge, a few AdamW steps on the server's few-shot set pull the fused model back
towards the tasks' decision boundaries. ``scope`` says what moves: ``transmitted`` (every
tensor of the global group, i.e. the non-frozen layers) or ``norms_biases`` (only LayerNorm
weights and biases of that group: a few thousand values, the cheapest and least overfitting).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from fedllm.data import Examples, TaskSuite
from fedllm.models import ModelBundle, forward_logits
from fedllm.vectors import get_tensors

if TYPE_CHECKING:
    from fedllm.lora_products import LoraProducts


def few_shot_set(pool: Examples, num_tasks: int, shots: int, seed: int) -> Examples:
    """``shots`` examples of each task from ``pool`` (the validation split), chosen by seed."""
    rng = random.Random(f"realign-{seed}")
    chosen: list[int] = []
    for t in range(num_tasks):
        idx = [i for i, task in enumerate(pool.tasks) if task == t]
        chosen += rng.sample(idx, min(shots, len(idx)))
    return pool.subset(sorted(chosen))


def realign_parameters(bundle: ModelBundle, scope: Literal["transmitted", "norms_biases"]) -> list[torch.nn.Parameter]:
    """The tensors realignment trains: only transmitted ones, since only those reach the clients."""
    params = dict(bundle.model.named_parameters())
    names = list(bundle.groups.global_names)
    if scope == "norms_biases":
        names = [n for n in names if "LayerNorm" in n or n.endswith(".bias")]
    return [params[n] for n in names]


def realigned_state(bundle: ModelBundle, lora: "LoraProducts | None") -> dict[str, torch.Tensor]:
    """What realignment changed, as the server's state: the trained transmitted tensors, or, with
    LoRA merged as weight deltas, the LoRA folded into the base weights (factors reset)."""
    if lora is not None:
        return lora.fold(bundle.model)
    return get_tensors(bundle.model, bundle.groups.global_names)


def few_shot_loss(bundle: ModelBundle, examples: Examples, suite: TaskSuite, max_length: int) -> torch.Tensor:
    logits = forward_logits(bundle, bundle.model, examples.texts, examples.tasks, suite.label_ranges, max_length)
    return F.cross_entropy(logits, torch.tensor(examples.labels, device=logits.device))


def realign(bundle: ModelBundle, examples: Examples, suite: TaskSuite, *, steps: int, lr: float,
            scope: Literal["transmitted", "norms_biases"], max_length: int, seed: int) -> tuple[float, float]:
    """Train the merged model in place on ``examples``; returns the few-shot loss before and after."""
    params = realign_parameters(bundle, scope)
    if not params:
        raise ValueError(f"realign_scope {scope!r} selects no tensor of the transmitted group")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(seed)
    model = bundle.model
    model.eval()  # no dropout: with a handful of examples, noise in the steps matters more than regularisation
    with torch.no_grad():
        before = float(few_shot_loss(bundle, examples, suite, max_length))
    for _ in range(steps):
        loss = few_shot_loss(bundle, examples, suite, max_length)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(few_shot_loss(bundle, examples, suite, max_length))
    return before, after
