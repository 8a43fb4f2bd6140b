"""Who the connected SuperNodes are: their data partition, asked once per node.

Sampling and the round record name clients by a run-stable identity ("p3" for the simulated or
declared partition 3, "n<node id>" for a device without one), not by Flower's node ids, which
change when a SuperNode reconnects.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm.apps.payload import METRICS
from fedllm.core.types import client_identity

log = logging.getLogger("fedllm")


class Nodes:
    def __init__(self, grid: Grid, reply_timeout: float | None) -> None:
        self.grid, self.reply_timeout = grid, reply_timeout
        self.identities: dict[int, str] = {}  # node id -> run-stable identity ("p3", or "n<node id>")
        self.declared_partitions = 0  # how many partitions the nodes say the data is split into

    def identify(self, nodes: list[int]) -> None:
        """Ask nodes not known yet who they are (their data partition; fedllm/apps/sampling.py). A node
        that does not answer, or whose SuperLink answers for it that it is gone, stays unknown: it is
        asked again next time instead of being sampled under its node id (after a SuperLink restart
        the database still lists nodes whose SuperNode has not reconnected yet)."""
        unknown = [n for n in nodes if n not in self.identities]
        if not unknown:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in self.grid.send_and_receive(messages, timeout=self.reply_timeout):
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            facts = dict(reply.content.metric_records.get(METRICS, {}))
            self.identities[node] = client_identity(facts, node)
            self.declared_partitions = max(self.declared_partitions, int(facts.get("partitions", 0)))
        silent = [n for n in unknown if n not in self.identities]
        if silent:
            log.warning("nodes %s did not say who they are; left out until they do", silent)

    def available(self, min_clients: int, timeout: float = 120.0) -> list[int]:
        """The connected nodes that have said who they are, once ``min_clients`` of them are (or
        ``timeout`` seconds have passed: the round then goes ahead with fewer, and is skipped)."""
        start = time.monotonic()
        while True:
            nodes = sorted(self.grid.get_node_ids())
            self.identify(nodes)
            known = [n for n in nodes if n in self.identities]
            if len(known) >= min_clients or time.monotonic() - start > timeout:
                return known
            time.sleep(0.5)

    def count(self, simulated: int) -> int:
        """How many clients the run has: the simulated partitions, else the connected nodes."""
        return simulated or len(self.grid.get_node_ids()) or 1

    def evaluate(self, content: RecordDict, rnd: int) -> dict[str, dict[str, float]]:
        """Every connected client scores what ``content`` carries on its own test data; by identity."""
        messages = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                    for n in sorted(self.grid.get_node_ids())]
        per_client: dict[str, dict[str, float]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.reply_timeout):
            if reply.has_error() or METRICS not in reply.content.metric_records:
                log.warning("round %d: evaluation failed on client %s", rnd, reply.metadata.src_node_id)
                continue
            metrics = dict(reply.content.metric_records[METRICS])
            per_client[client_identity(metrics, reply.metadata.src_node_id)] = metrics
        return per_client
