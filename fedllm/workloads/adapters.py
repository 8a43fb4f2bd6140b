"""Bottleneck adapters (Houlsby et al. 2019), which PEFT does not provide.

An adapter wraps a Linear layer: ``y = W x + up(gelu(down(W x)))``, with ``up`` zero-initialised
so the wrapped model starts exactly as the pretrained one. In BERT-style encoders wrapping
``output.dense`` places one adapter after the attention block and one after the feed-forward
block of every layer, the paper's placement. PFTT uses adapters as the shared (global) part and
LoRA as the personal (local) part; the adapter tensors are named ``...adapter_down/adapter_up``.
"""

from __future__ import annotations

import torch
from torch import nn

from fedllm.core.vectors import matches


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


def add_adapters(model: nn.Module, targets: list[str], bottleneck: int) -> int:
    """Wrap every Linear whose name matches ``targets``; returns how many were wrapped."""
    chosen = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and matches(name, targets)]
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, BottleneckAdapter(getattr(parent, child), bottleneck))
    if not chosen:
        raise ValueError(f"peft.adapter_targets {targets} match no Linear layer of the model")
    return len(chosen)
