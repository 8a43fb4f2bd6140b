"""R-MTLLMF's few-shot realignment: a few AdamW steps on a merged model, in place.

After the merge, a few steps on the server's few-shot set pull the fused model back towards the
tasks' decision boundaries. ``scope`` says what moves: ``transmitted`` (every tensor of the
global group, i.e. the non-frozen layers) or ``norms_biases`` (only the normalisation layers'
weights and the biases of that group: a few thousand values, the cheapest and least overfitting).
Normalisation layers are found by module type, not by name, so BERT's ``LayerNorm``, Llama's
``input_layernorm``/``norm`` (RMSNorm, and no biases) and GPT-2's ``ln_1`` all count. Only transmitted
tensors move, since only those reach the clients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from fedllm.core.bundle import ModelBundle
from fedllm.core.memory import release_free_memory

Scope = Literal["transmitted", "norms_biases"]


def realign_parameters(bundle: ModelBundle, scope: Scope) -> list[torch.nn.Parameter]:
    """The tensors realignment trains."""
    params = dict(bundle.model.named_parameters())
    names = list(bundle.groups.global_names)
    if scope == "norms_biases":
        norms = normalisation_parameter_names(bundle.model)
        names = [n for n in names if n in norms or n.endswith(".bias")]
    return [params[n] for n in names]


def normalisation_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters of normalisation modules (torch's LayerNorm/RMSNorm/GroupNorm and the models' own
    ``*RMSNorm``/``*LayerNorm`` classes, which transformers defines per architecture)."""
    out = set()
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)) or kind.endswith("Norm"):
            out |= {f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)}
    return out


def realign(model: torch.nn.Module, params: list[torch.nn.Parameter], loss: Callable[[], torch.Tensor], *,
            steps: int, lr: float, seed: int) -> tuple[float, float]:
    """Train ``params`` of ``model`` in place on ``loss``; returns the loss before and after. Only
    ``params`` take gradients meanwhile: the backward pass then skips every other weight's gradient
    (on SmolLM2, 106M values of gradient for a few thousand RMSNorm weights: 2 steps on 40 shots
    took 27.7 s instead of 34.5 s) and leaves no stale ``.grad`` on the model."""
    if not params:
        raise ValueError("realignment selects no tensor of the transmitted group")
    flags = {p: p.requires_grad for p in model.parameters()}
    trained = set(params)
    for p in flags:
        p.requires_grad_(p in trained)
    try:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        torch.manual_seed(seed)
        model.eval()  # no dropout: with a handful of examples, noise in the steps matters more than regularisation
        with torch.no_grad():
            before = float(loss())
        for _ in range(steps):
            value = loss()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            after = float(loss())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        release_free_memory()  # the backward passes' activations, freed inside the heap
    return before, after
