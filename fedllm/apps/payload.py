"""What crosses the wire, and the server's check of every client reply.

Down: ``global`` (ArrayRecord of the transmitted group) + ``config`` (the resolved
experiment as JSON, the round, the number of partitions). Up: ``delta`` (ArrayRecord of
``after - before`` of exactly the global group) + ``metrics``. A reply that does not fit
(missing keys, wrong names or shapes, NaN/Inf, no examples) is rejected with a reason and
left out of the fusion; one bad client never stops the server.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedllm.apps.array_view import tensor_in_place
from fedllm.apps.fingerprint import code_fingerprint, code_location
from fedllm.core.lora_ranks import RANK_METRIC, rank_axis, rank_layout
from fedllm.core.types import ClientUpdate, client_identity
from fedllm.core.vectors import Layout, all_finite
from fedllm.fusion.running_sum import RunningSum

from fedllm.apps.wire import CONFIG, DELTA, DOWN, GLOBAL, METRICS, NUM_EXAMPLES, RAY_NODE  # noqa: F401 (re-exported)


def round_content(global_params: dict[str, torch.Tensor], config_json: str, server_round: int,
                  num_partitions: int, downlink: dict[str, dict[str, torch.Tensor]] | None = None) -> RecordDict:
    content = RecordDict({
        GLOBAL: ArrayRecord(torch_state_dict=global_params),
        CONFIG: ConfigRecord({"experiment": config_json, "round": server_round, "num-partitions": num_partitions,
                              "code": code_fingerprint(), "code-location": code_location()}),
    })
    for name, tensors in (downlink or {}).items():
        content[DOWN + name] = ArrayRecord(torch_state_dict=tensors)
    return content


STAT = "stat."  # + the statistic's name: per-client statistics a fusion rule fuses with


def reply_content(delta: dict[str, torch.Tensor], metrics: dict[str, float | int],
                  stats: dict[str, dict[str, torch.Tensor]] | None = None) -> RecordDict:
    content = RecordDict({DELTA: ArrayRecord(torch_state_dict=delta), METRICS: MetricRecord(metrics)})
    for name, tensors in (stats or {}).items():
        content[STAT + name] = ArrayRecord(torch_state_dict=tensors)
    return content


def _checked_arrays(arrays: ArrayRecord, layout: Layout, node: int, what: str) -> Iterator[tuple[int, torch.Tensor]]:
    """Each tensor of a reply in ``layout`` order, with its offset in the flat layout, read and
    checked (readable, its shape) one at a time: a reply is never held twice over (message + tensors)."""
    names = list(arrays.keys())
    if set(names) != set(layout.names):
        missing = sorted(set(layout.names) - set(names))[:3]
        extra = sorted(set(names) - set(layout.names))[:3]
        raise RejectedReply(f"client {node}: {what} names do not match (missing {missing}, unexpected {extra})")
    offset = 0
    for name, shape, size in zip(layout.names, layout.shapes, layout.sizes):
        try:
            values = tensor_in_place(arrays[name])
        except (TypeError, ValueError) as exc:  # not a NumPy array, or bytes that do not parse as one
            raise RejectedReply(f"client {node}: {name} cannot be read as an array ({exc})") from None
        if values.is_complex() or values.dtype == torch.bool:
            raise RejectedReply(f"client {node}: {name} holds {values.dtype} values, not real numbers")
        if tuple(values.shape) != shape:
            raise RejectedReply(f"client {node}: {name} has shape {tuple(values.shape)}, expected {shape}"
                                + ("" if what == "parameter" else f" (in its {what})"))
        yield offset, values
        offset += size


def _non_finite(node: int, what: str, count: int) -> RejectedReply:
    return RejectedReply(f"client {node}: {'delta' if what == 'parameter' else what} has {count} NaN/Inf values")


def _checked_flat(arrays: ArrayRecord, layout: Layout, node: int, what: str,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    flat = out if out is not None and out.numel() == layout.numel else torch.empty(layout.numel)
    for offset, values in _checked_arrays(arrays, layout, node, what):
        flat[offset:offset + values.numel()] = values.reshape(-1)
    if not all_finite(flat):
        raise _non_finite(node, what, int((~torch.isfinite(flat)).sum()))
    return flat


def _added_to(running: RunningSum, arrays: ArrayRecord, layout: Layout, node: int, num_examples: int,
              client_id: str) -> None:
    """Add a reply into the round's running sum, tensor by tensor, once all of it is checked: a bad
    reply must not leave half of itself in the sum. It is read twice (check, and its norm where the
    sum clips; then add) so that no copy of the whole payload is made. Over a noisy channel the reply
    then crosses it (fedllm/fusion/per_client_uplink.py: in segments of packets where it can, read from
    the reply's tensors) and what arrives is added; DP there clips what arrived, not what was sent."""
    sent_norm = running.needs_norm and running.uplink is None
    bad, squares = 0, 0.0
    for _, values in _checked_arrays(arrays, layout, node, "parameter"):
        if torch.is_floating_point(values) and not all_finite(values):
            bad += int((~torch.isfinite(values)).sum())
        elif sent_norm:
            squares += float(torch.linalg.vector_norm(values if torch.is_floating_point(values) else values.double())) ** 2
    if bad:
        raise _non_finite(node, "parameter", bad)
    if running.uplink is not None:
        running.add_received(client_id, _checked_arrays(arrays, layout, node, "parameter"), layout.numel, num_examples)
        return
    weight = running.weight(num_examples, math.sqrt(squares) if running.needs_norm else None)
    for offset, values in _checked_arrays(arrays, layout, node, "parameter"):
        running.add_piece(offset, values, weight)
    running.count_reply(weight)


class RejectedReply(ValueError):
    """A reply the server will not fuse; ``str()`` is the logged reason."""


def parse_reply(msg: Message, layout: Layout, node: int | None = None,
                stat_layouts: dict[str, Layout] | None = None, out: torch.Tensor | None = None,
                running: RunningSum | None = None) -> ClientUpdate:
    """Turn a client reply into a flat delta, or raise :class:`RejectedReply` saying why (``node``: the
    node the message was sent to; by default the reply's sender). ``out``: where to write the delta
    (a row of the round's reply stack) when it has the full layout. ``running``: add the delta into
    the round's running sum instead (the update then carries no delta)."""
    node = msg.metadata.src_node_id if node is None else node
    if msg.has_error():  # the reason may carry a whole remote traceback: its last line says what happened
        lines = [line.strip() for line in str(msg.error.reason).strip().splitlines() if line.strip()]
        raise RejectedReply(f"client {node} failed: {(lines[-1] if lines else 'no reason given')[:500]}")
    content = msg.content
    if DELTA not in content.array_records or METRICS not in content.metric_records:
        raise RejectedReply(f"client {node}: reply lacks '{DELTA}' or '{METRICS}' records")
    metrics = dict(content.metric_records[METRICS])
    rank = reported_rank(metrics, layout, node)
    num_examples = int(metrics.get(NUM_EXAMPLES, 0))
    if num_examples <= 0:
        raise RejectedReply(f"client {node}: reported {num_examples} examples")
    if running is not None and rank is not None:  # strategy.running_sum is checked to go with one rank
        raise RejectedReply(f"client {node}: sent LoRA rank {rank}, but the round adds replies of the global "
                            "rank into a running sum (strategy.running_sum); give every node the same rank")
    flat = None
    if running is None:
        flat = _checked_flat(content.array_records[DELTA], layout if rank is None else rank_layout(layout, rank),
                             node, "parameter", out)
    stats = {}
    for name, stat_layout in (stat_layouts or {}).items():
        if STAT + name not in content.array_records:
            raise RejectedReply(f"client {node}: reply lacks the '{name}' statistics the fusion rule needs")
        stats[name] = _checked_flat(content.array_records[STAT + name], stat_layout, node, name)
    if running is not None:  # last: a reply rejected for anything is not in the sum
        _added_to(running, content.array_records[DELTA], layout, node, num_examples, client_identity(metrics, node))
    return ClientUpdate(node, flat, num_examples, {k: float(v) for k, v in metrics.items()}, stats, rank)


def global_rank(layout: Layout) -> int | None:
    """The rank of the sent LoRA factors (None when no LoRA factor is sent)."""
    ranks = {shape[axis] for name, shape in zip(layout.names, layout.shapes) if (axis := rank_axis(name)) is not None}
    return max(ranks) if ranks else None


def reported_rank(metrics: dict, layout: Layout, node: int) -> int | None:
    """The LoRA rank a client says it trained at, when below the global one (its payload is smaller)."""
    if RANK_METRIC not in metrics:
        return None
    top, rank = global_rank(layout), metrics[RANK_METRIC]
    if top is None or rank == top:
        return None
    if not isinstance(rank, int) or not 1 <= rank < top:
        raise RejectedReply(f"client {node}: LoRA rank {rank!r} does not fit the global rank {top} (peft.r); a "
                            f"client's rank is a whole number from 1 to {top}")
    return rank


def payload_bytes(content: RecordDict) -> int:
    """What a reply's payload took on the uplink: 4 bytes per value sent (its update and statistics)."""
    return 4 * sum(math.prod(array.shape) for name, record in content.array_records.items()
                   if name == DELTA or name.startswith(STAT) for array in record.values())


def reject_outlier_norms(updates: list[ClientUpdate], ratio: float | None) -> tuple[list[ClientUpdate], list[str]]:
    """Drop updates whose norm exceeds ``ratio`` x the median norm of the round (3+ updates)."""
    if ratio is None or len(updates) < 3:
        return updates, []
    norms = torch.stack([torch.linalg.vector_norm(u.delta, dtype=torch.float32) for u in updates])
    bound = float(norms.median()) * ratio
    kept, reasons = [], []
    for u, norm in zip(updates, norms.tolist()):
        if norm > bound:
            reasons.append(f"client {u.node_id}: delta norm {norm:.3g} > {ratio:g} x median {bound / ratio:.3g}")
        else:
            kept.append(u)
    return kept, reasons
