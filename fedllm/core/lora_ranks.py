"""Heterogeneous LoRA ranks: what a rank-r_k client's tensors look like next to the global rank r.

Edge devices of different sizes train LoRA at different ranks (HetLoRA, FlexLoRA, FLoRA). The
server keeps the global LoRA at ``peft.r``; a client of rank r_k <= r keeps the first r_k
components: the first r_k rows of every ``lora_A`` (r x in) and the first r_k columns of every
``lora_B`` (out x r). Its ``lora_alpha`` is ``peft.alpha * r_k / r``, so every client's LoRA has
the global scaling ``alpha / r`` and its first r_k components mean what the global ones mean.

A client sends its own (smaller) factors; the server zero-pads them to the global rank right
after the channel, and then a padded client's ``B @ A`` is exactly its own (the padding adds
zero rows to A and zero columns to B). What is fused then depends on ``peft.fuse_lora_as``:
the padded factors (HetLoRA's zero-padding), the products folded into the base weights (FLoRA's
stacking sums exactly these), or the products re-factorised by SVD (FlexLoRA;
fedllm/fusion/lora_products.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedllm.core.errors import ConfigError
from fedllm.core.vectors import Layout, Tensors, flatten, unflatten

RANK_METRIC = "lora_rank"  # what a client reports of its rank in its reply's metrics


def rank_axis(name: str) -> int | None:
    """The axis of a LoRA factor that has the rank's size (0 for A, 1 for B); None for other tensors."""
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


def rank_layout(layout: Layout, rank: int) -> Layout:
    """The layout of a rank-``rank`` client's tensors, given the global (rank r) layout."""
    shapes = []
    for name, shape in zip(layout.names, layout.shapes):
        axis = rank_axis(name)
        shapes.append(shape if axis is None else tuple(rank if i == axis else s for i, s in enumerate(shape)))
    return Layout(layout.names, tuple(shapes))


def pad_rows(rows: torch.Tensor, rank_lay: Layout, global_lay: Layout,
             beyond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(clients x rank-layout values) -> (clients x global-layout values): each LoRA factor's leading
    block is the client's, the rest ``beyond``'s (zeros by default: HetLoRA's zero-padding)."""
    if rank_lay == global_lay:
        return rows
    out = []
    for row in rows:
        tensors = unflatten(row, rank_lay)
        padded = {}
        for name, shape in zip(global_lay.names, global_lay.shapes):
            t = tensors[name]
            if tuple(t.shape) != shape:
                full = beyond[name].to(t.dtype).clone() if beyond and name in beyond else t.new_zeros(shape)
                full[tuple(slice(0, s) for s in t.shape)] = t
                t = full
            padded[name] = t
        out.append(flatten(padded, global_lay))
    return torch.stack(out)


def truncate_to(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> Tensors:
    """Global tensors cut to a client's own shapes: its first r_k LoRA components. Only LoRA factors are
    cut, only along the rank axis; any other mismatch is an error naming the tensor."""
    out: Tensors = {}
    for name, t in tensors.items():
        want = tuple(shapes[name]) if name in shapes else tuple(t.shape)
        if tuple(t.shape) != want:
            axis = rank_axis(name)
            same_elsewhere = axis is not None and all(a == b for i, (a, b) in enumerate(zip(t.shape, want)) if i != axis)
            if not same_elsewhere or want[axis] > t.shape[axis]:
                raise ConfigError(f"tensor {name!r}: the server sent shape {tuple(t.shape)}, this client's model has "
                                  f"{want}; only LoRA factors may differ, and only by a rank up to the global peft.r")
            t = t.narrow(axis, 0, want[axis])
        out[name] = t
    return out


def client_rank(peft: Any, partition_id: int, node_config: Mapping[str, Any]) -> int:
    """This client's LoRA rank: node-config ``lora-rank`` (a device class), else ``peft.ranks`` by
    partition (cycled), else the global ``peft.r``."""
    if "lora-rank" in node_config:
        raw = node_config["lora-rank"]
        try:
            rank = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"node config lora-rank={raw!r} is not a whole number (e.g. lora-rank=4)") from None
        source = f"node config lora-rank={rank}"
    elif peft.ranks and partition_id >= 0:
        rank, source = peft.ranks[partition_id % len(peft.ranks)], f"peft.ranks (partition {partition_id})"
    else:
        return int(peft.r)
    if not 1 <= rank <= peft.r:
        raise ConfigError(f"{source}: a client's LoRA rank must be between 1 and the global rank peft.r={peft.r} "
                          f"(raise peft.r to at least {rank}, or lower the client's rank)")
    return rank


def rank_config(cfg: Any, rank: int) -> Any:
    """The experiment as a rank-``rank`` client builds its model: ``peft.r`` its rank, ``peft.alpha``
    scaled so that its LoRA scaling is the global ``alpha / r``."""
    if rank == cfg.peft.r:
        return cfg
    peft = cfg.peft.model_copy(update={"r": rank, "alpha": cfg.peft.alpha * rank / cfg.peft.r})
    return cfg.model_copy(update={"peft": peft})
