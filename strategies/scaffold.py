"""SCAFFOLD's server half (Karimireddy et al., ICML 2020): the global update is the (example-weighted)
mean of the client deltas, and the server control variate moves by the clients' control deltas,
c <- c + |S| / N mean_i Delta c_i (S: the clients of the round, N: all clients). The server sends c
down with the global group; each client's Delta c_i crosses the uplink with its delta, through the
same channel, and is counted in the round's bytes. The client half is ``client.trainer: scaffold``
(fedllm/clients/scaffold.py). c is part of the server checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from fedllm.core.vectors import Tensors, unflatten

from .base import FUSION_RULES, STATISTIC_LAYOUTS, FusionRule, FusionSpace, per_sent_value, weighted_mean

CONTROL = "control"
STATISTIC_LAYOUTS.register(CONTROL)(per_sent_value)


@FUSION_RULES.register("scaffold")
class Scaffold(FusionRule):
    client_trainer = "scaffold"

    def __init__(self, params=None, seed: int = 0) -> None:
        super().__init__(params, seed)
        self.control: torch.Tensor | None = None  # the server control variate c, in the sent layout

    def client_statistics(self) -> dict[str, dict[str, Any]]:
        return {CONTROL: {}}

    def fuse_with(self, deltas: torch.Tensor, weights: torch.Tensor, stats: dict[str, torch.Tensor],
                  space: FusionSpace) -> torch.Tensor:
        n = deltas.shape[0]
        total = self.population or n
        if self.control is None:
            self.control = torch.zeros(deltas.shape[1], dtype=deltas.dtype)
        self.control = self.control + (n / total) * stats[CONTROL].mean(dim=0)
        return weighted_mean(deltas, weights)

    def downlink(self, space: FusionSpace) -> dict[str, Tensors]:
        control = self.control if self.control is not None else torch.zeros(space.layout.numel)
        return {CONTROL: unflatten(control, space.layout)}

    def state_dict(self) -> dict[str, Any]:
        return {"control": None if self.control is None else self.control.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.control = state.get("control")
