"""One server update from checked client updates: stack, transmit through the channel, fuse, apply.

Pure tensor code (no Flower), so the server's core step is unit tested directly.
"""

from __future__ import annotations

from collections.abc import Callable
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


def fuse_updates(updates: list[ClientUpdate], channel: Channel, fuse: FusionRule, dp: DPSettings | None = None,
                 to_fusion_space: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The fused delta of a round after the channel (``None`` if every payload was lost) and its record.

    ``to_fusion_space`` maps the received rows to what is fused when that is not what was sent
    (LoRA factors -> weight deltas B @ A, fedllm/lora_products.py); the channel always sees the payload.
    Updates are put in client-id order first: replies arrive in any order, and the channel's
    noise draws and the fusion's float sums must not depend on it (reproducible runs, resume)."""
    updates = sorted(updates, key=lambda u: u.client_id)
    batch = torch.stack([u.delta for u in updates])
    weights = torch.tensor([float(u.num_examples) for u in updates])
    meta = ClientMeta(ids=[u.client_id for u in updates], num_examples=weights)
    received, report = channel.transmit(batch, meta)
    record: dict[str, Any] = report.summary()
    keep = ~report.dropped
    if to_fusion_space is not None and not report.aggregated:
        received = to_fusion_space(received)
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
    """``global + scale * fused`` on the tensors of ``layout``; the others (e.g. LoRA factors kept at
    their initial value while their product is folded into base weights) stay as they are."""
    if fused is None:
        return global_params
    delta = unflatten(fused, layout)
    return {**global_params, **add({n: global_params[n] for n in delta}, delta, scale)}
