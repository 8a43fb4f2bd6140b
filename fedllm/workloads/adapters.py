"""Bottleneck adapters (Houlsby et al. 2019), which PEFT does not provide.

An adapter wraps a Linear layer: ``y = W x + up(gelu(down(W x)))``, with ``up`` zero-initialised
so the wrapped model starts exactly as the pretrained one. The paper places one adapter after the
attention block and one after the feed-forward block of every layer, i.e. on the output
projection of each: ``output.dense`` in BERT-style encoders (it matches both), ``o_proj`` and
``down_proj`` in Llama-family decoders. PFTT uses adapters as the shared (global) part and LoRA
as the personal (local) part; the adapter tensors are named ``...adapter_down/adapter_up``.
"""

from __future__ import annotations

import torch
from torch import nn

from fedllm.core.errors import ConfigError
from fedllm.core.vectors import matches

# model_type -> the output projections of its attention and feed-forward blocks
ADAPTER_PLACES = {
    "bert": ["output.dense"],
    "llama": ["o_proj", "down_proj"],
    "mistral": ["o_proj", "down_proj"],
    "qwen2": ["o_proj", "down_proj"],
}


class BottleneckAdapter(nn.Module):
    def __init__(self, base: nn.Linear, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        self.adapter_down = nn.Linear(base.out_features, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, base.out_features)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.adapter_up(nn.functional.gelu(self.adapter_down(h)))


def linear_layers(model: nn.Module) -> list[str]:
    """Full names of the model's linear layers (GPT-2's Conv1D included)."""
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Linear, Conv1D)) or name.endswith((".adapter_down", ".adapter_up")):
            continue
        names.append(name.removesuffix(".base"))  # a layer an adapter wraps keeps its own name
    return names


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what target patterns usually name)."""
    return sorted({name.rpartition(".")[2] for name in linear_layers(model)})


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "unknown"))


def adapter_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """``peft.adapter_targets``, or with ``None`` the architecture's own places."""
    if targets is not None:
        return targets
    kind = model_type(model)
    if kind not in ADAPTER_PLACES:
        raise ConfigError(f"peft.adapter_targets: no default placement for a {kind!r} model; name its attention- and "
                         f"feed-forward-output layers (its linear layers: {', '.join(linear_layer_names(model))})")
    return ADAPTER_PLACES[kind]


def add_adapters(model: nn.Module, targets: list[str] | None, bottleneck: int) -> int:
    """Wrap every Linear whose name matches ``targets``; returns how many were wrapped."""
    targets = adapter_targets(model, targets)
    chosen = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and matches(name, targets)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, BottleneckAdapter(getattr(parent, child), bottleneck))
    if not chosen:
        raise ConfigError(f"peft.adapter_targets {targets} match no linear layer of this {model_type(model)!r} model; "
                         f"its linear layers: {', '.join(linear_layer_names(model))}")
    return len(chosen)
