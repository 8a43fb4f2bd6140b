"""LoRA task vectors as weight deltas: each client's update is what PEFT's ``get_delta_weight`` makes
of its factors, per adapted layer.

Fusing the factors themselves (averaging all A's and all B's, as FedIT does) does not fuse the
updates: mean(B) @ mean(A) is not mean(B @ A), and TIES or DARE applied to A and B trims and
drops entries of factors, not of the weight change they make. Task arithmetic, TIES and DARE
are defined on weight deltas, so with ``peft.fuse_lora_as: weight_delta`` clients still send only
their LoRA factors (cheap, and what the channel corrupts), and the server turns every received
pair into its weight delta, fuses those, and folds the result into the adapted layers' base
weights. Clients then start the next round from the merged weights with their LoRA at its
initial value (the server sends both).

The weight delta of a pair of factors is the adapted layer's own ``get_delta_weight`` (PEFT's
tuner layer owns the scaling, ``fan_in_fan_out`` for GPT-2's Conv1D, and dtypes): the received
factors are put into the server's layer for the call and the layer's own factors put back after.
A client's update is relative to the factors' initial value: delta(A0 + dA, B0 + dB) - delta(A0, B0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedllm.core.errors import ConfigError
from fedllm.core.vectors import Layout, Tensors, flatten, unflatten


@dataclass(frozen=True)
class LoraPair:
    """One adapted layer: the PEFT tuner layer, its adapter, the names of its factors and base weight."""

    layer: torch.nn.Module  # a peft LoraLayer
    adapter: str
    a: str
    b: str
    weight: str


class LoraProducts:
    """Maps client rows in the factor layout (what is sent) to rows in the weight layout (what is fused).

    Transmitted tensors that are not LoRA factors (a head, adapters) pass through unchanged."""

    def __init__(self, pairs: tuple[LoraPair, ...], factor_layout: Layout, weight_layout: Layout,
                 initial: Mapping[str, torch.Tensor], passthrough: tuple[str, ...]) -> None:
        self.pairs, self.factor_layout, self.weight_layout = pairs, factor_layout, weight_layout
        self.passthrough = passthrough
        # the factors' initial values: clients send ``trained - initial``
        self.initial = {n: initial[n].detach().to("cpu", torch.float32) for p in pairs for n in (p.a, p.b)}
        with self._factors(self.initial):
            self.initial_delta = {p.weight: self._delta(p) for p in pairs}

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
                frozen_a = a not in sent and b in sent and not params[a].requires_grad  # FFA-LoRA: A fixed
                if (a not in sent and not frozen_a) or b not in sent:
                    raise ConfigError(f"peft.fuse_lora_as weight_delta needs both factors of {module_name} in "
                                     "peft.global_patterns (one is sent, the other not)")
                if weight not in params:
                    raise ConfigError(f"peft.fuse_lora_as weight_delta: {module_name} is not a linear layer "
                                     "with a base weight; use fuse_lora_as: factors")
                pairs.append(LoraPair(module, adapter, a, b, weight))
        if not pairs:
            raise ConfigError("peft.fuse_lora_as weight_delta: no LoRA layer is sent (check peft.method: lora "
                             "and that peft.global_patterns include 'lora_')")
        in_pairs = {n for p in pairs for n in (p.a, p.b)}
        passthrough = tuple(n for n in global_names if n not in in_pairs)
        weights = {p.weight: params[p.weight] for p in pairs}
        weights.update({n: params[n] for n in passthrough})
        start = {**{n: params[n].detach() for n in in_pairs}, **initial}  # a frozen A is not sent: its value is the model's
        return cls(tuple(pairs), Layout.of({n: initial[n] for n in global_names}), Layout.of(weights), start,
                   passthrough)

    @staticmethod
    def _delta(pair: LoraPair) -> torch.Tensor:
        return pair.layer.get_delta_weight(pair.adapter).detach().to("cpu", torch.float32)

    @contextmanager
    def _factors(self, factors: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """The layers hold ``factors`` (by name) inside the block, their own factors again after it."""
        own = {}
        with torch.no_grad():
            for p in self.pairs:
                for name, module in ((p.a, p.layer.lora_A[p.adapter]), (p.b, p.layer.lora_B[p.adapter])):
                    own[name] = module.weight.detach().clone()
                    if name in factors:
                        module.weight.copy_(factors[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for p in self.pairs:
                    p.layer.lora_A[p.adapter].weight.copy_(own[p.a])
                    p.layer.lora_B[p.adapter].weight.copy_(own[p.b])

    def _weight_delta_loaded(self, factor_deltas: Mapping[str, torch.Tensor]) -> Tensors:
        out: Tensors = {}
        with torch.no_grad():
            for p in self.pairs:
                for name, module in ((p.a, p.layer.lora_A[p.adapter]), (p.b, p.layer.lora_B[p.adapter])):
                    moved = factor_deltas[name].float() if name in factor_deltas else 0.0  # a frozen A does not move
                    module.weight.copy_(self.initial[name] + moved)
                out[p.weight] = self._delta(p) - self.initial_delta[p.weight]  # zero when nothing was learnt
        out.update({n: factor_deltas[n] for n in self.passthrough})
        return out

    def weight_delta(self, factor_deltas: Mapping[str, torch.Tensor]) -> Tensors:
        """Named weight deltas from one client's named factor deltas."""
        with self._factors({}):
            return self._weight_delta_loaded(factor_deltas)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(clients x factor values) -> (clients x weight values)."""
        with self._factors({}):
            return torch.stack([flatten(self._weight_delta_loaded(unflatten(row, self.factor_layout)),
                                        self.weight_layout) for row in rows])

    def fold(self, model: torch.nn.Module) -> Tensors:
        """Fold the model's current LoRA (relative to its initial value) into the base weights and
        reset the factors: the merged weights, in the weight layout. Used after the server trains
        the LoRA factors of a merged model (R-MTLLMF's realignment)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for p in self.pairs:
                delta = self._delta(p) - self.initial_delta[p.weight]
                params[p.weight].add_(delta.to(params[p.weight].device, params[p.weight].dtype))
                params[p.a].copy_(self.initial[p.a])
                params[p.b].copy_(self.initial[p.b])
        return {n: params[n].detach().to("cpu", copy=True) for n in self.weight_layout.names}
