"""The server side of one experiment: sampling, reply collection, checkpoints and the round record.

What is trained and scored comes from the workload (fedllm/workloads), what happens to the
replies from the fusion pipeline (fedllm/fusion/pipeline.py); this class is the round loop of
../shared/DESIGN.md around them, with Flower only in :meth:`collect` and :meth:`evaluate_federated`.
"""

from __future__ import annotations

import logging
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedllm.apps.console import done_line, round_line, start_line
from fedllm.apps.payload import (DELTA, METRICS, RAY_NODE, RejectedReply, parse_reply, payload_bytes,
                                 reject_outlier_norms, round_content)
from fedllm.apps.sampling import sample_clients
from fedllm.config import ConfigError, ExperimentConfig
from fedllm.core.types import ClientUpdate
from fedllm.core.vectors import Layout
from fedllm.fusion.pipeline import FusionPipeline
from fedllm.results.writer import ResultsWriter, check_results_dir, load_checkpoint, save_checkpoint
from fedllm.workloads import workload_for

log = logging.getLogger("fedllm")
# error replies the SuperLink makes for a node that is gone (not errors raised by a client)
GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB); in a simulation the server runs in
    the driver process, so this is the server's."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_record(updates: list[ClientUpdate]) -> dict[str, Any]:
    """What the clients report of their training: loss, time, how far their personal parts moved."""
    examples = sum(u.num_examples for u in updates)
    record: dict[str, Any] = {"train_loss": sum(u.metrics["train_loss"] * u.num_examples for u in updates) / examples}
    times = [u.metrics["train_time"] for u in updates if "train_time" in u.metrics]
    if times:  # where a round's time goes: the slowest client bounds it
        record["client_train_time_max"], record["client_train_time_mean"] = max(times), sum(times) / len(times)
    if len({u.metrics[RAY_NODE] for u in updates if RAY_NODE in u.metrics}) > 1:  # where a Ray cluster ran each
        record["client_ray_node"] = {u.client_id: f"{int(u.metrics[RAY_NODE]):012x}" for u in updates
                                     if RAY_NODE in u.metrics}
    if any(u.metrics.get("local_norm") for u in updates):  # personal parts: how far each has moved
        record["client_local_norm"] = {u.client_id: u.metrics["local_norm"] for u in updates}
        record["client_local_rounds"] = {u.client_id: int(u.metrics.get("local_rounds", 0)) for u in updates}
    return record


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
        started = time.perf_counter()
        row = self.stack[self.row_of[node]] if self.stack is not None else None
        try:
            self.updates.append(parse_reply(reply, layout, node, stat_layouts, out=row))
        except RejectedReply as why:
            self.rejected.append(str(why))
        self.check_seconds += time.perf_counter() - started

    def compact(self) -> None:
        """Move the used rows to the top of the stack, in client-id order, so that fusion takes them as
        one view (fedllm/core/vectors.py ``stack_rows``); rows of rejected or missing clients go."""
        if self.stack is None:
            return
        memory = self.stack.untyped_storage().data_ptr()
        in_stack = sorted((u for u in self.updates if u.delta.untyped_storage().data_ptr() == memory),
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


class FederatedRun:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, echo: Callable[[str], None] = print,
                 resume: Path | None = None, results_root: Path | None = None) -> None:
        self.grid, self.cfg, self.echo = grid, cfg, echo
        if resume is None:  # an unusable results folder is an error now, not after the model is built
            check_results_dir(cfg, results_root)
        self.workload = workload_for(cfg)
        if cfg.data.num_clients:  # simulated partitions: an empty one fails here, before a results folder exists
            self.workload.check_data(cfg.data.num_clients)
        self.bundle = self.workload.build_model()
        self.pipeline = FusionPipeline(cfg, self.workload, self.bundle)
        self.global_params = self.pipeline.initial_global()
        # what a client sends: its update and the statistics the rule fuses with
        self.payload_bytes = 4 * (self.pipeline.layout.numel + sum(l.numel for l in self.pipeline.stat_layouts.values()))
        self.down_bytes = 4 * (sum(t.numel() for t in self.global_params.values())
                               + sum(t.numel() for d in self.pipeline.downlink().values() for t in d.values()))
        self.rng = random.Random(cfg.seed)
        self.config_json = cfg.to_json()
        self.totals: dict[str, Any] = {"bytes_up": 0, "bytes_down": 0, "elapsed": 0.0}
        self.next_round = 1
        self.identities: dict[int, str] = {}  # node id -> run-stable identity ("p3", or "n<node id>")
        self.declared_partitions = 0  # how many partitions the nodes say the data is split into
        self.stopped: str | None = None  # why the run ended before its last round, if it did
        self.results_root = results_root
        self.writer: ResultsWriter | None = None  # made once the clients' data is known to fit (run())
        if resume is not None:
            self.writer = ResultsWriter(cfg, resume_dir=resume)
            self._restore(resume)

    def _state(self) -> dict:
        return {"round": self.next_round - 1, "global_params": self.global_params, "totals": self.totals,
                "sampler": self.rng.getstate(), "config_digest": self.cfg.digest(), **self.pipeline.state()}

    def _restore(self, run_dir: Path) -> None:
        state = load_checkpoint(run_dir)
        if state["config_digest"] != self.cfg.digest():
            raise ConfigError(f"cannot resume {run_dir}: it was made by another config "
                              f"(digest {state['config_digest']}, this one {self.cfg.digest()})")
        self.global_params, self.totals = state["global_params"], state["totals"]
        self.rng.setstate(state["sampler"])
        self.pipeline.load_state(state)
        self.next_round = state["round"] + 1
        self.writer.truncate_after(state["round"])
        self.echo(f"fedllm: resuming {run_dir} after round {state['round']}")

    def num_clients(self) -> int:
        return self.cfg.data.num_clients or len(self.grid.get_node_ids()) or 1

    def evaluate(self, rnd: int) -> dict[str, Any]:
        result = self.workload.evaluate(self.bundle, self.global_params, self.num_clients())
        if result.samples:
            self.writer.log_samples(rnd, result.samples)
        return result.metrics

    def evaluate_federated(self, rnd: int) -> dict[str, Any]:
        """Every client scores the global group plus its own local group on its own test data."""
        content = round_content(self.global_params, self.config_json, rnd, self.cfg.data.num_clients or 0)
        messages = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                    for n in sorted(self.grid.get_node_ids())]
        per_client: dict[str, dict[str, float]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.strategy.round_timeout):
            if reply.has_error() or METRICS not in reply.content.metric_records:
                log.warning("round %d: evaluation failed on client %s", rnd, reply.metadata.src_node_id)
                continue
            metrics = dict(reply.content.metric_records[METRICS])
            name = f"p{int(metrics['partition'])}" if "partition" in metrics else f"n{reply.metadata.src_node_id}"
            per_client[name] = metrics
        return self.workload.summarize_clients(per_client)

    def identify(self, nodes: list[int]) -> None:
        """Ask nodes not known yet who they are (their data partition; fedllm/apps/sampling.py). A node
        that does not answer, or whose SuperLink answers for it that it is gone, stays unknown: it is
        asked again next time instead of being sampled under its node id (after a SuperLink restart
        the database still lists nodes whose SuperNode has not reconnected yet)."""
        unknown = [n for n in nodes if n not in self.identities]
        if not unknown:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.strategy.round_timeout):
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            facts = dict(reply.content.metric_records.get(METRICS, {}))
            self.identities[node] = f"p{int(facts['partition'])}" if "partition" in facts else f"n{node}"
            self.declared_partitions = max(self.declared_partitions, int(facts.get("partitions", 0)))
        silent = [n for n in unknown if n not in self.identities]
        if silent:
            log.warning("nodes %s did not say who they are; left out until they do", silent)

    def available_nodes(self, timeout: float = 120.0) -> list[int]:
        """The connected nodes that have said who they are, once ``strategy.min_clients`` of them are
        (or ``timeout`` seconds have passed: the round then goes ahead with fewer, and is skipped)."""
        start = time.monotonic()
        while True:
            nodes = sorted(self.grid.get_node_ids())
            self.identify(nodes)
            known = [n for n in nodes if n in self.identities]
            if len(known) >= self.cfg.strategy.min_clients or time.monotonic() - start > timeout:
                return known
            time.sleep(0.5)

    def collect(self, rnd: int) -> Replies:
        """Sample clients, send the global group, and sort every sampled client into exactly one of
        used, rejected (it replied, but not usably: an error, a bad payload, an outlier) and missing
        (no reply within ``strategy.round_timeout``, or the SuperLink reports the node gone). Replies
        are pulled as they arrive and kept only as flat deltas."""
        strategy = self.cfg.strategy
        sampled = sample_clients(strategy, {n: self.identities[n] for n in self.available_nodes()}, self.rng)
        sending = time.monotonic()
        content = round_content(self.global_params, self.config_json, rnd, self.cfg.data.num_clients or 0,
                                self.pipeline.downlink())
        messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in sampled]
        self.grid.push_messages(messages)
        sent = time.monotonic()
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        del messages, content
        out = Replies(sampled, stack=torch.empty(len(sampled), self.pipeline.layout.numel),
                      row_order=sorted(sampled, key=lambda n: self.identities[n]))  # fusion's order
        pending, started = set(node_of), time.monotonic()
        while pending and time.monotonic() - started < (strategy.round_timeout or float("inf")):
            for reply in self.grid.pull_messages(list(pending)):
                message_id = reply.metadata.reply_to_message_id
                pending.discard(message_id)
                out.take(node_of[message_id], reply, self.pipeline.layout, self.pipeline.stat_layouts)
            if pending:
                time.sleep(0.05)
        waited = time.monotonic() - started
        out.phases = {"send": sent - sending, "wait_for_clients": time.monotonic() - sent - out.check_seconds}
        checked = time.perf_counter()
        out.updates, outliers = reject_outlier_norms(out.updates, self.pipeline.outlier_ratio)
        out.compact()
        out.check_seconds += time.perf_counter() - checked
        out.rejected += outliers
        for why in out.rejected:
            log.warning("round %d: rejected reply: %s", rnd, why)
        timed_out = sorted(node_of[m] for m in pending)
        if timed_out:
            log.warning("round %d: %d of %d sampled clients did not reply within %.1fs: nodes %s", rnd,
                        len(timed_out), len(sampled), waited, timed_out)
        out.missing = sorted(out.missing + timed_out)
        return out

    def round_update(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        """The fusion pipeline on this round's usable updates; returns what to record of it."""
        self.global_params, record = self.pipeline(self.global_params, updates, self.cfg.seed + rnd,
                                                   population=len(self.identities), server_round=rnd)
        return {**record, **training_record(updates)}

    def round(self, rnd: int) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.monotonic()
        replies = self.collect(rnd)
        updates = replies.updates
        record: dict[str, Any] = {
            "round": rnd, "clients_sampled": len(replies.sampled), "sampled": [self.identities[n] for n in replies.sampled],
            "clients_replied": replies.arrived, "clients_used": len(updates), "clients_rejected": len(replies.rejected),
            "clients_missing": len(replies.missing), "missing_nodes": replies.missing, "rejected": replies.rejected,
            "bytes_up": replies.bytes_up, "bytes_down": self.down_bytes * len(replies.sampled),
            "bytes_up_per_client": replies.bytes_up // replies.payloads if replies.payloads else self.payload_bytes}
        if len(updates) < cfg.strategy.min_clients:
            self.echo(f"[round {rnd}/{cfg.rounds}] skipped: {len(updates)} usable replies < strategy.min_clients="
                      f"{cfg.strategy.min_clients}")
            record["skipped"] = True
        else:
            record.update(self.round_update(rnd, updates))
        record["phase_times"] = {**replies.phases, "checks": replies.check_seconds,
                            **{k.removeprefix("seconds_"): record.pop(k) for k in list(record) if k.startswith("seconds_")}}
        if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
            t_eval = time.monotonic()
            if cfg.eval.centralized:
                record.update(self.evaluate(rnd))
            if cfg.eval.federated:
                record.update(self.evaluate_federated(rnd))
            record["eval_time"] = record["phase_times"]["evaluation"] = time.monotonic() - t_eval
        self.totals["bytes_up"] += record["bytes_up"]
        self.totals["bytes_down"] += record["bytes_down"]
        record["round_time"] = time.monotonic() - t0
        return record

    def summary(self) -> dict[str, Any]:
        final, m = self.writer.records[-1], self.workload.metric
        return {"experiment": self.cfg.run_name(), "rounds": self.cfg.rounds, "final_accuracy": final.get("accuracy"),
                f"final_{m}": final.get(m), **{k: v for k, v in final.items() if k.startswith(("accuracy/", "reward/"))},
                **{k: final[k] for k in (f"personalized_{m}", f"worst_client_{m}", "preference_matrix", "dp_epsilon")
                   if k in final},
                "total_bytes_up": self.totals["bytes_up"], "total_bytes_down": self.totals["bytes_down"],
                "bytes_up_per_client_per_round": self.payload_bytes, "wall_time": self.totals["elapsed"],
                "config_digest": self.cfg.digest(), "server_peak_rss_mb": peak_rss_mb(),
                "phase_times": self.phase_totals(),
                **({"stopped_early": self.stopped} if self.stopped else {})}

    def phase_totals(self) -> dict[str, float]:
        """Where the run's time went, summed over its rounds (``fedllm run --profile`` prints it)."""
        totals: dict[str, float] = {}
        for record in self.writer.records:
            for phase, seconds in record.get("phase_times", {}).items():
                totals[phase] = totals.get(phase, 0.0) + seconds
            if "client_train_time_max" in record:
                totals["slowest_client_training"] = (totals.get("slowest_client_training", 0.0)
                                                     + record["client_train_time_max"])
        totals["checkpoint"] = self.totals.get("checkpoint_seconds", 0.0)
        return totals

    def run(self) -> Path:
        cfg, m = self.cfg, self.workload.metric
        # who is who, asked once before anything is written (its cost is the clients' start-up, not a
        # round's); under flwr run the nodes say how many partitions the data is split into, which
        # must fit the data before training starts and before a results folder exists
        self.available_nodes()
        if not cfg.data.num_clients and self.declared_partitions:
            self.workload.check_data(self.declared_partitions)
        if self.writer is None:
            self.writer = ResultsWriter(cfg, root=self.results_root)
        self.echo(start_line(cfg.run_name(), cfg.model.name, cfg.peft.method, self.workload.describe(),
                             self.pipeline.layout.numel, self.payload_bytes, self.writer.dir))
        if self.next_round == 1:
            scores = self.evaluate(0) if cfg.eval.centralized and cfg.eval.initial else {}
            self.writer.log_round({"round": 0, **scores, "bytes_up": 0, "bytes_down": 0, "wall_time": 0.0})
            self.echo(f"[round 0/{cfg.rounds}] " + (f"{m}={scores[m]:.4f} (before training)" if m in scores
                                                    else "not evaluated before training"))
            save_checkpoint(self.writer.dir, self._state())
        start = time.monotonic() - self.totals["elapsed"]
        for rnd in range(self.next_round, cfg.rounds + 1):
            if self.pipeline.exceeds_privacy_budget():  # stop cleanly: the last checkpoint stays
                self.stopped = (f"stopped before round {rnd}: it would take epsilon above strategy.dp_target_epsilon="
                                f"{cfg.strategy.dp_target_epsilon:g}")
                self.echo(f"fedllm: {self.stopped}")
                break
            record = self.round(rnd)
            self.totals["elapsed"] = record["wall_time"] = time.monotonic() - start
            self.writer.log_round(record)
            self.next_round = rnd + 1
            started_checkpoint = time.perf_counter()
            save_checkpoint(self.writer.dir, self._state())
            self.totals["checkpoint_seconds"] = (self.totals.get("checkpoint_seconds", 0.0)
                                                 + time.perf_counter() - started_checkpoint)
            self.echo(round_line(record, cfg.rounds, m, record["bytes_up_per_client"]))
        summary = self.summary()
        self.writer.finish(self.global_params, summary)
        self.echo(done_line(summary, m, self.writer.dir))
        return self.writer.dir
