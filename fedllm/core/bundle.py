"""A ready model and what a client needs to reset it between (virtual) clients.

Both workloads (a classifier, a causal-LM policy) hand their model to trainers, fusion and
evaluation as a :class:`ModelBundle`; :func:`forward_logits` is the classifier's forward pass
with each example restricted to its own task's labels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedllm.core.accelerator import autocast
from fedllm.core.vectors import ParameterGroups, Tensors, get_tensors, split_groups


@dataclass
class ModelBundle:
    model: torch.nn.Module
    tokenizer: object
    groups: ParameterGroups
    initial_global: Tensors
    initial_local: Tensors
    device: torch.device
    precision: str = "float32"  # model.precision: forward passes autocast to it (fedllm/core/accelerator.py)


def assemble_bundle(model: torch.nn.Module, tokenizer: object, global_patterns: list[str], local_patterns: list[str],
                    device: torch.device, precision: str, placed: bool = False) -> ModelBundle:
    """A PEFT-wrapped model as a bundle: its parameter groups, the model on ``device`` (unless ``placed``:
    a k-bit model is placed by ``from_pretrained`` and cannot be moved) and its initial groups."""
    groups = split_groups(model, global_patterns, local_patterns)
    if not placed:
        model.to(device)
    return ModelBundle(model=model, tokenizer=tokenizer, groups=groups,
                       initial_global=get_tensors(model, groups.global_names),
                       initial_local=get_tensors(model, groups.local_names), device=device, precision=precision)


class BundleCache:
    """The last few model bundles of this process, by model-defining key. A worker serves many rounds
    and virtual clients; with heterogeneous LoRA ranks it needs one model per rank, and rebuilding on
    every switch would cost a model load per client."""

    def __init__(self, size: int = 4) -> None:
        self.size, self.bundles = size, OrderedDict[str, ModelBundle]()

    def get(self, key: str, build: Callable[[], ModelBundle]) -> ModelBundle:
        if key in self.bundles:
            self.bundles.move_to_end(key)
        else:
            while len(self.bundles) >= self.size:
                self.bundles.popitem(last=False)
            self.bundles[key] = build()
        return self.bundles[key]


def masked_logits(logits: torch.Tensor, tasks: torch.Tensor, label_ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Restrict each example to its own task's labels in the joint label space."""
    mask = torch.full_like(logits, float("-inf"))
    for t, (lo, hi) in enumerate(label_ranges):
        rows = tasks == t
        if rows.any():
            mask[rows, lo:hi] = 0.0
    return logits + mask


# A token spans at most this many characters in the tokenizers fedllm meets, so cutting a text here
# keeps every token that truncation to max_length would keep, and a 10 MB text costs what a short one does.
CHARS_PER_TOKEN_BOUND = 32


def forward_logits(bundle: ModelBundle, model: torch.nn.Module, texts: list[str], tasks: list[int],
                   label_ranges: list[tuple[int, int]], max_length: int) -> torch.Tensor:
    texts = [t[: max_length * CHARS_PER_TOKEN_BOUND] for t in texts]
    enc = bundle.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    enc = {k: v.to(bundle.device) for k, v in enc.items()}
    with autocast(bundle.precision, bundle.device):
        logits = model(**enc).logits
    logits = logits.float()  # the loss and the label masking stay float32
    return masked_logits(logits, torch.tensor(tasks, device=logits.device), label_ranges)
