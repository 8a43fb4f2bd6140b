"""One server update from checked client updates: stack, transmit through the channel, fuse, apply.

Pure tensor code (no Flower), so the server's core step is unit tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from channels import Channel, ClientMeta
from fedllm.payload import ClientUpdate
from fedllm.vectors import Layout, Tensors, add, unflatten
from fedllm.privacy import dp_mean
from strategies import FusionRule


@dataclass
class DPSettings:
    clip_norm: float
    noise_multiplier: float
    generator: torch.Generator


def fuse_updates(updates: list[ClientUpdate], channel: Channel, fuse: FusionRule, dp: DPSettings | None = None
                 ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The fused delta of a round after the channel (``None`` if every payload was lost) and its record.

    Updates are put in client-id order first: replies arrive in any order, and the channel's
    noise draws and the fusion's float sums must not depend on it (reproducible runs, resume)."""
    updates = sorted(updates, key=lambda u: u.client_id)
    batch = torch.stack([u.delta for u in updates])
    weights = torch.tensor([float(u.num_examples) for u in updates])
    meta = ClientMeta(ids=[u.client_id for u in updates], num_examples=weights)
    received, report = channel.transmit(batch, meta)
    record: dict[str, Any] = report.summary()
    keep = ~report.dropped
    if report.aggregated:  # over-the-air: the channel already delivered the weighted mean
        fused = received[0]
    elif keep.any() and dp is not None:  # DP-FedAvg: clipped uniform mean plus Gaussian noise
        fused = dp_mean(received[keep], dp.clip_norm, dp.noise_multiplier, dp.generator)
    elif keep.any():
        fused = fuse(received[keep], weights[keep])
    else:
        record["all_lost"] = True
        return None, record
    record["update_norm"] = float(torch.linalg.vector_norm(fused))
    return fused, record


def apply_update(global_params: Tensors, fused: torch.Tensor | None, layout: Layout, scale: float) -> Tensors:
    return global_params if fused is None else add(global_params, unflatten(fused, layout), scale)
