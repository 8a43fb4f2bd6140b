"""FedAvg (McMahan et al. 2017): the example-weighted mean of the client deltas."""

from __future__ import annotations

import torch

from strategies.base import FUSION_RULES


@FUSION_RULES.register("fedavg")
def fedavg(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if deltas.ndim != 2 or weights.shape != (deltas.shape[0],):
        raise ValueError(
            f"fedavg needs deltas (clients x d) and weights (clients,), got "
            f"{tuple(deltas.shape)} and {tuple(weights.shape)}"
        )
    total = weights.sum()
    if total <= 0:
        raise ValueError("fedavg needs a positive total weight (number of examples)")
    w = (weights / total).to(deltas.dtype)
    return w @ deltas
