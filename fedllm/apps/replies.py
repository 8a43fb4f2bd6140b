"""One round's replies: pulled as they arrive, checked, and kept only as rows of one stack (or,
with strategy.running_sum, added into one sum and not kept at all).

Every sampled client ends in exactly one of used (an update), rejected (it replied, but not
usably: an error, a bad payload, an outlier) and missing (no reply within the round's timeout, or
the SuperLink reports the node gone).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedllm.apps.payload import DELTA, RejectedReply, parse_reply, payload_bytes, reject_outlier_norms
from fedllm.core.types import ClientUpdate
from fedllm.core.vectors import Layout
from fedllm.fusion.running_sum import RunningSum

log = logging.getLogger("fedllm")
# error replies the SuperLink makes for a node that is gone (not errors raised by a client)
GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


@dataclass
class Replies:
    """One round's sampled clients, each in exactly one of: used (an update), rejected, missing."""

    sampled: list[int]
    updates: list[ClientUpdate] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # one reason per rejected client
    missing: list[int] = field(default_factory=list)
    arrived: int = 0  # replies from the clients themselves (errors they raised included)
    payloads: int = 0  # replies that carried a payload: what used the uplink
    bytes_up: int = 0  # what those payloads took (clients of lower LoRA rank send less)
    check_seconds: float = 0.0  # the server's time spent checking and unpacking replies
    phases: dict[str, float] = field(default_factory=dict)  # seconds of the round's steps (record "phase_times")
    # The payloads, written as they arrive into the rows of one (sampled x values) tensor, in client-id
    # order (fusion's order): no reply is held twice, and fusion takes the rows without stacking them.
    # Pages of rows no reply reaches are never touched. Payloads of a lower LoRA rank are kept apart.
    stack: torch.Tensor | None = None
    row_order: list[int] | None = None  # the sampled nodes in the order of their rows (default: as sampled)
    # strategy.running_sum: each checked payload is added into this sum instead (no stack at all)
    running: RunningSum | None = None

    def __post_init__(self) -> None:
        self.row_of = {node: i for i, node in enumerate(self.row_order or self.sampled)}

    def take(self, node: int, reply: Message, layout: Layout, stat_layouts: dict[str, Layout]) -> None:
        if reply.has_error() and reply.error.code in GONE:  # the SuperLink answered for a node that is gone
            self.missing.append(node)
            log.warning("node %s is unavailable: %s", node, reply.error.reason)
            return
        self.arrived += 1
        if not reply.has_error() and DELTA in reply.content.array_records:
            self.payloads += 1
            self.bytes_up += payload_bytes(reply.content)
        started, in_channel = time.perf_counter(), self._channel_seconds()
        row = self.stack[self.row_of[node]] if self.stack is not None else None
        try:
            self.updates.append(parse_reply(reply, layout, node, stat_layouts, out=row, running=self.running))
        except RejectedReply as why:
            self.rejected.append(str(why))
        # a running sum over a noisy channel sends the reply through it here: that time is the channel's
        self.check_seconds += time.perf_counter() - started - (self._channel_seconds() - in_channel)

    def _channel_seconds(self) -> float:
        uplink = self.running.uplink if self.running is not None else None
        return uplink.seconds if uplink is not None else 0.0

    def compact(self) -> None:
        """Move the used rows to the top of the stack, in client-id order, so that fusion takes them as
        one view (fedllm/core/vectors.py ``stack_rows``); rows of rejected or missing clients go."""
        if self.stack is None:
            return
        memory = self.stack.untyped_storage().data_ptr()
        in_stack = sorted((u for u in self.updates
                           if u.delta is not None and u.delta.untyped_storage().data_ptr() == memory),
                          key=lambda u: u.client_id)
        rows = [self.row_of[u.node_id] for u in in_stack]
        if rows == sorted(rows):  # rows only move up: none is overwritten before it is read
            for top, row in enumerate(rows):
                if row != top:
                    self.stack[top].copy_(self.stack[row])
        else:  # a client named otherwise than it said it was: gather through a copy
            self.stack[:len(rows)] = self.stack[torch.tensor(rows, dtype=torch.long)]
        for top, update in enumerate(in_stack):
            update.delta = self.stack[top]

    def finish(self, outlier_ratio: float, timed_out: list[int], rnd: int, waited: float) -> None:
        """After the last pull: norm outliers rejected, the stack compacted, what went wrong logged."""
        checked = time.perf_counter()
        self.updates, outliers = reject_outlier_norms(self.updates, outlier_ratio)
        self.compact()
        self.check_seconds += time.perf_counter() - checked
        self.rejected += outliers
        for why in self.rejected:
            log.warning("round %d: rejected reply: %s", rnd, why)
        if timed_out:
            log.warning("round %d: %d of %d sampled clients did not reply within %.1fs: nodes %s", rnd,
                        len(timed_out), len(self.sampled), waited, timed_out)
        self.missing = sorted(self.missing + timed_out)

    def record(self, identities: dict[int, str], down_bytes: int, payload_bytes: int) -> dict[str, Any]:
        """The round record's part about who was asked and what came back."""
        return {"clients_sampled": len(self.sampled), "sampled": [identities[n] for n in self.sampled],
                "clients_replied": self.arrived, "clients_used": len(self.updates),
                "clients_rejected": len(self.rejected), "clients_missing": len(self.missing),
                "missing_nodes": self.missing, "rejected": self.rejected, "bytes_up": self.bytes_up,
                "bytes_down": down_bytes * len(self.sampled),
                "bytes_up_per_client": self.bytes_up // self.payloads if self.payloads else payload_bytes}


def gather(grid: Grid, messages: list[Message], out: Replies, layout: Layout, stat_layouts: dict[str, Layout],
           timeout: float | None, outlier_ratio: float, rnd: int) -> Replies:
    """Send the round's messages and take each reply into ``out`` as it arrives, until all are in or
    ``timeout`` seconds have passed; the messages are not held after they are pushed."""
    sending = time.monotonic()
    grid.push_messages(messages)
    sent = time.monotonic()
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    messages.clear()
    pending, started = set(node_of), time.monotonic()
    while pending and time.monotonic() - started < (timeout or float("inf")):
        arrived = list(grid.pull_messages(list(pending)))[::-1]
        while arrived:  # one pull may bring many whole payloads: each is dropped once taken
            _take(arrived.pop(), out, node_of, pending, layout, stat_layouts)
        if pending:
            time.sleep(0.05)
    waited = time.monotonic() - started
    out.phases = {"send": sent - sending, "wait_for_clients": time.monotonic() - sent - out.check_seconds}
    out.finish(outlier_ratio, sorted(node_of[m] for m in pending), rnd, waited)
    return out


def _take(reply: Message, out: Replies, node_of: dict[str, int], pending: set[str], layout: Layout,
          stat_layouts: dict[str, Layout]) -> None:
    """One pulled reply into ``out``; a function, so that nothing holds the message once it is taken."""
    message_id = reply.metadata.reply_to_message_id
    pending.discard(message_id)
    out.take(node_of[message_id], reply, layout, stat_layouts)
