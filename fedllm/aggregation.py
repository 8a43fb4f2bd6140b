"""One server update from checked client updates: stack, transmit through the channel, fuse, apply.

Pure tensor code (no Flower), so the server's core step is unit tested directly.
"""

from __future__ import annotations

from typing import Any

import torch

from channels import Channel, ClientMeta
from fedllm.payload import ClientUpdate
from fedllm.vectors import Layout, Tensors, add, unflatten
from strategies import FusionRule


def aggregate(global_params: Tensors, updates: list[ClientUpdate], layout: Layout, channel: Channel,
              fuse: FusionRule, server_lr: float = 1.0) -> tuple[Tensors, dict[str, Any]]:
    """New global parameters and the round's channel/fusion record (unchanged if all were lost)."""
    batch = torch.stack([u.delta for u in updates])
    weights = torch.tensor([float(u.num_examples) for u in updates])
    meta = ClientMeta(ids=[str(u.node_id) for u in updates], num_examples=weights)
    received, report = channel.transmit(batch, meta)
    record: dict[str, Any] = report.summary()
    keep = ~report.dropped
    if report.aggregated:  # over-the-air: the channel already delivered the weighted mean
        fused = received[0]
    elif keep.any():
        fused = fuse(received[keep], weights[keep])
    else:
        record["all_lost"] = True
        return global_params, record
    record["update_norm"] = float(torch.linalg.vector_norm(fused))
    return add(global_params, unflatten(fused, layout), server_lr), record
