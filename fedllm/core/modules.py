"""Which linear layers' weights a client's update changes (for statistics of their inputs)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def sent_linear_layers(model: nn.Module, global_names: Iterable[str]) -> dict[str, nn.Linear]:
    """Weight name -> Linear module, for every linear layer whose weight is sent, or whose LoRA is
    (then the weight is the LoRA's base layer's, where its update B @ A is folded)."""
    modules = dict(model.named_modules())
    out: dict[str, nn.Linear] = {}
    for name in global_names:
        if ".lora_A." in name:
            base = name.split(".lora_A.")[0] + ".base_layer"
            if isinstance(modules.get(base), nn.Linear):
                out[f"{base}.weight"] = modules[base]
        elif name.endswith(".weight") and isinstance(modules.get(name.removesuffix(".weight")), nn.Linear):
            out[name] = modules[name.removesuffix(".weight")]
    return out
