"""LoRA task vectors as weight deltas: each client's update is ``scaling * B @ A`` per adapted layer.

Fusing the factors themselves (averaging all A's and all B's, as FedIT does) does not fuse the
updates: mean(B) @ mean(A) is not mean(B @ A), and TIES or DARE applied to A and B trims and
drops entries of factors, not of the weight change they make. Task arithmetic, TIES and DARE
are defined on weight deltas, so with ``peft.fuse_lora_as: weight_delta`` clients still send only
their LoRA factors (cheap, and what the channel corrupts), and the server turns every received
pair into its weight delta, fuses those, and folds the result into the adapted layers' base
weights. Clients then start the next round from the merged weights with their LoRA at its
initial value (the server sends both).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping

import torch

from fedllm.vectors import Layout, Tensors, flatten, unflatten


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear layer: the names of its factors and of the base weight they update."""

    a: str
    b: str
    weight: str
    scaling: float
    fan_in_fan_out: bool  # GPT-2's Conv1D stores the weight transposed


@dataclass(frozen=True)
class LoraProducts:
    """Maps client rows in the factor layout (what is sent) to rows in the weight layout (what is fused).

    Transmitted tensors that are not LoRA factors (a head, adapters) pass through unchanged."""

    factor_layout: Layout
    weight_layout: Layout
    pairs: tuple[LoraPair, ...]
    initial: Tensors  # the factors' initial values: clients send ``trained - initial``
    passthrough: tuple[str, ...]

    @classmethod
    def of(cls, model: torch.nn.Module, global_names: tuple[str, ...], initial: Mapping[str, torch.Tensor]
           ) -> "LoraProducts":
        from peft.tuners.lora import LoraLayer

        params = dict(model.named_parameters())
        sent = set(global_names)
        pairs: list[LoraPair] = []
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in module.lora_A:
                a = f"{module_name}.lora_A.{adapter}.weight"
                b = f"{module_name}.lora_B.{adapter}.weight"
                weight = f"{module_name}.base_layer.weight"
                if a not in sent and b not in sent:
                    continue  # a local (personal) LoRA: never sent, never merged
                if a not in sent or b not in sent:
                    raise ValueError(f"peft.fuse_lora_as weight_delta needs both factors of {module_name} in "
                                     "peft.global_patterns (one is sent, the other not)")
                if weight not in params:
                    raise ValueError(f"peft.fuse_lora_as weight_delta: {module_name} is not a linear layer "
                                     "with a base weight; use fuse_lora_as: factors")
                pairs.append(LoraPair(a, b, weight, float(module.scaling[adapter]),
                                      bool(getattr(module, "fan_in_fan_out", False))))
        if not pairs:
            raise ValueError("peft.fuse_lora_as weight_delta: no LoRA layer is sent (check peft.method: lora "
                             "and that peft.global_patterns include 'lora_')")
        in_pairs = {n for p in pairs for n in (p.a, p.b)}
        passthrough = tuple(n for n in global_names if n not in in_pairs)
        weights = {p.weight: params[p.weight] for p in pairs}
        weights.update({n: params[n] for n in passthrough})
        return cls(Layout.of({n: initial[n] for n in global_names}), Layout.of(weights), tuple(pairs),
                   {n: initial[n].detach().to("cpu", torch.float32) for n in in_pairs}, passthrough)

    def weight_delta(self, factors: Mapping[str, torch.Tensor]) -> Tensors:
        """Named weight deltas from named factor deltas (one client)."""
        out: Tensors = {}
        for p in self.pairs:
            a0, b0 = self.initial[p.a], self.initial[p.b]
            a, b = a0 + factors[p.a].float(), b0 + factors[p.b].float()
            delta = p.scaling * (b @ a - b0 @ a0)  # minus the initial product: zero when nothing was learnt
            out[p.weight] = delta.T if p.fan_in_fan_out else delta
        out.update({n: factors[n] for n in self.passthrough})
        return out

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(clients x factor values) -> (clients x weight values)."""
        return torch.stack([flatten(self.weight_delta(unflatten(row, self.factor_layout)), self.weight_layout)
                            for row in rows])

    def fold(self, model: torch.nn.Module) -> Tensors:
        """Fold the model's current LoRA (relative to its initial value) into the base weights and
        reset the factors: the merged weights, in the weight layout. Used after the server trains
        the LoRA factors of a merged model (R-MTLLMF's realignment)."""
        params = dict(model.named_parameters())
        factors = {n: params[n].detach().cpu().float() - self.initial[n] for n in self.initial}
        deltas = self.weight_delta({**factors, **{n: torch.zeros(0) for n in self.passthrough}})
        with torch.no_grad():
            for p in self.pairs:
                params[p.weight].add_(deltas[p.weight].to(params[p.weight].device, params[p.weight].dtype))
                params[p.a].copy_(self.initial[p.a])
                params[p.b].copy_(self.initial[p.b])
        return {n: params[n].detach().to("cpu", copy=True) for n in self.weight_layout.names}
