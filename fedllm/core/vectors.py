"""Named parameter groups, flat vectors and deltas (task vectors).

Channels and fusion rules see only flat float tensors; a :class:`Layout` maps a flat
vector back to named tensors. A client's task vector is ``after - before`` of its
transmitted group, as in Ilharco et al.'s task arithmetic.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedllm.core.errors import ConfigError

Tensors = dict[str, torch.Tensor]


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` contains a plain pattern or matches a glob pattern (one with * ? [)."""
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif pattern in name:
            return True
    return False


@dataclass(frozen=True)
class ParameterGroups:
    """Which trainable tensors are sent (``global``) and which stay on the client (``local``)."""

    global_names: tuple[str, ...]
    local_names: tuple[str, ...]


def split_groups(model: torch.nn.Module, global_patterns: list[str], local_patterns: list[str]) -> ParameterGroups:
    """Assign every trainable parameter to the global or local group (global wins a tie).

    A trainable tensor in neither group would train but be neither sent nor kept, and
    leak between clients that share a worker; that is a config error, named here.
    """
    global_names, local_names, orphans = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if matches(name, global_patterns):
            global_names.append(name)
        elif matches(name, local_patterns):
            local_names.append(name)
        else:
            orphans.append(name)
    if orphans:
        raise ConfigError(
            f"trainable tensor {orphans[0]!r} (and {len(orphans) - 1} more) matches neither "
            f"peft.global_patterns {global_patterns} nor peft.local_patterns {local_patterns}; "
            "add a pattern for it (e.g. '*' in global_patterns for full fine-tuning)"
        )
    if not global_names and global_patterns:
        raise ConfigError(f"peft.global_patterns {global_patterns} select no trainable tensor: nothing would be sent")
    return ParameterGroups(tuple(global_names), tuple(local_names))


def get_tensors(model: torch.nn.Module, names: Iterable[str]) -> Tensors:
    """Detached CPU copies of the named parameters."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


@torch.no_grad()
def set_tensors(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        target = params[name]
        if target.shape != value.shape:
            raise ValueError(f"tensor {name!r}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
        target.copy_(value.to(device=target.device, dtype=target.dtype))


@dataclass(frozen=True)
class Layout:
    """Order, names and shapes of the tensors packed into one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> "Layout":
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def flatten(tensors: Mapping[str, torch.Tensor], layout: Layout | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate tensors (in ``layout`` order) into one float32 vector (into ``out`` when given: a
    row of the server's reply stack, so a payload is not held twice)."""
    layout = layout or Layout.of(tensors)
    if not layout.names:
        return torch.zeros(0) if out is None else out
    return torch.cat([tensors[n].detach().reshape(-1).to(torch.float32) for n in layout.names], out=out)


def all_finite(values: torch.Tensor, block: int = 1 << 22) -> bool:
    """``torch.isfinite(values).all()`` in blocks of ``block`` values: isfinite builds an absolute
    value and two masks the size of its input, which for a round's stacked payloads (64 x 8 MB)
    is 870 MB at once; blocks keep it to a few MB."""
    flat = values.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(block))


def stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)``, without the copy when the rows already lie one after another in one
    block of memory (the server writes replies into such a stack as they arrive): then a view of
    that block. The result may share memory with ``rows``: read it, do not write it."""
    first = rows[0]
    width = first.numel()
    if first.dim() == 1 and first.is_contiguous() and all(
            r.dim() == 1 and r.is_contiguous() and r.numel() == width and r.dtype == first.dtype
            and r.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and r.storage_offset() == first.storage_offset() + i * width for i, r in enumerate(rows)):
        return first.as_strided((len(rows), width), (width, 1))
    return torch.stack(list(rows))


def unflatten(flat: torch.Tensor, layout: Layout) -> Tensors:
    if flat.ndim != 1 or flat.numel() != layout.numel:
        raise ValueError(f"flat vector of {flat.numel()} values does not fit a layout of {layout.numel}")
    pieces = torch.split(flat, layout.sizes)
    return {n: p.reshape(s) for n, p, s in zip(layout.names, pieces, layout.shapes)}


def subtract(after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> Tensors:
    """Task vector / delta: ``after - before`` per name."""
    return {n: after[n] - before[n] for n in before}


def add(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> Tensors:
    return {n: base[n] + scale * delta[n].to(base[n].dtype) for n in base}
