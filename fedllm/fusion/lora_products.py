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

:class:`SvdProducts` is FlexLoRA (Bai et al. 2024, ``fuse_lora_as: svd``): the global LoRA is the
SVD of the fused product, the base weights never change, and a client of rank r_k starts from
the first r_k components, its best rank-r_k share of the product (Eckart-Young).
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

    # ------------------------------------------------ how the pipeline uses a fusion space
    def global_tensors(self, model: torch.nn.Module) -> Tensors:
        """What the global state holds besides the sent group: the base weights the products fold into."""
        params = dict(model.named_parameters())
        return {p.weight: params[p.weight].detach().to("cpu", copy=True) for p in self.pairs}

    def start_round(self, global_params: Mapping[str, torch.Tensor]) -> None:
        """The factors every client starts the round from are their initial value: nothing to do."""

    def padding(self, global_params: Mapping[str, torch.Tensor]) -> Tensors | None:
        """What a rank-r_k client's update holds beyond its rank, relative to the round's start: zero."""
        return None

    def apply(self, global_params: Tensors, fused: torch.Tensor | None, scale: float) -> Tensors:
        from fedllm.fusion.pipeline import apply_update

        return apply_update(global_params, fused, self.weight_layout, scale)

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


def svd_factors(product: torch.Tensor, rank: int, scaling: float, spare_a: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of rank ``rank`` with ``scaling * B @ A`` the best rank-``rank`` approximation of ``product``
    (out x in), components by decreasing singular value, split evenly (sqrt(S) on each side). A component
    with no singular value (the product has lower rank) gets ``spare_a``'s row and a zero column of B, so it
    adds nothing but can still learn (with A and B both zero neither would get a gradient)."""
    u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / scaling).sqrt()
    b = torch.zeros(product.shape[0], rank, dtype=torch.float64)
    a = spare_a.double().clone()
    live = s[:k] > (s[0] * 1e-7 if s.numel() and s[0] > 0 else float("inf"))
    b[:, :k] = torch.where(live, u[:, :k] * root, 0.0)
    a[:k] = torch.where(live[:, None], root[:, None] * vh[:k], a[:k])
    return b.float(), a.float()


class SvdProducts(LoraProducts):
    """FlexLoRA: clients' whole products fused, then re-factorised into the global factors by SVD.

    A client's row is its full product minus the round's global product, so averaging the rows and
    adding them to the global product averages the full products, as FlexLoRA does. The global factors
    stay SVD-ordered, so a client of rank r_k keeping their first r_k components starts from the best
    rank-r_k approximation of the global product; what lies beyond its rank is not its to keep, so its
    update takes it out (:meth:`padding`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spare = dict(self.initial)  # the factors' first value: A rows for null components

    def global_tensors(self, model: torch.nn.Module) -> Tensors:
        return {}  # the base weights never change; only factors go down

    def start_round(self, global_params: Mapping[str, torch.Tensor]) -> None:
        """The round's clients start from the global factors: products are relative to them."""
        self.initial = {n: global_params[n].detach().to("cpu", torch.float32) for p in self.pairs for n in (p.a, p.b)}
        with self._factors(self.initial):
            self.initial_delta = {p.weight: self._delta(p) for p in self.pairs}

    def padding(self, global_params: Mapping[str, torch.Tensor]) -> Tensors | None:
        """Beyond its rank a client's factors are zero: relative to the global ones, minus them."""
        return {n: -global_params[n].detach().to("cpu", torch.float32) for p in self.pairs for n in (p.a, p.b)}

    def apply(self, global_params: Tensors, fused: torch.Tensor | None, scale: float) -> Tensors:
        """The global product plus ``scale`` x the fused rows, re-factorised at the global rank."""
        if fused is None:
            return global_params
        delta = unflatten(fused, self.weight_layout)
        out = dict(global_params)
        with self._factors({n: global_params[n].float() for p in self.pairs for n in (p.a, p.b)}):
            for p in self.pairs:
                product = self._delta(p) + scale * delta[p.weight]
                if p.layer.fan_in_fan_out:  # GPT-2's Conv1D keeps its weight as in x out
                    product = product.T
                scaling = float(p.layer.scaling[p.adapter])
                b, a = svd_factors(product, global_params[p.b].shape[1], scaling, self.spare[p.a])
                out[p.a], out[p.b] = a.to(global_params[p.a].dtype), b.to(global_params[p.b].dtype)
        for name in self.passthrough:
            out[name] = global_params[name] + scale * delta[name].to(global_params[name].dtype)
        return out

    def fold(self, model: torch.nn.Module) -> Tensors:
        raise ConfigError("peft.fuse_lora_as 'svd' keeps the base weights fixed; folding LoRA into them is "
                          "weight_delta's way")
