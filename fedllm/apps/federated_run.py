"""The server side of one experiment: sampling, reply collection, checkpoints and the round record.

What is trained and scored comes from the workload (fedllm/workloads), what happens to the
replies from the fusion pipeline (fedllm/fusion/pipeline.py), who the clients are from
fedllm/apps/nodes.py, how replies are pulled and checked from fedllm/apps/replies.py; this class is
the round loop of ../shared/DESIGN.md around them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedllm.apps.console import done_line, round_line, start_line
from fedllm.apps.nodes import Nodes
from fedllm.apps.payload import round_content
from fedllm.apps.replies import Replies, gather
from fedllm.apps.run_record import run_summary, training_record
from fedllm.apps.sampling import sample_clients
from fedllm.config import ConfigError, ExperimentConfig
from fedllm.core.types import ClientUpdate
from fedllm.fusion.pipeline import FusionPipeline
from fedllm.fusion.running_sum import RunningSum
from fedllm.results.writer import ResultsWriter, check_results_dir, load_checkpoint, save_checkpoint
from fedllm.workloads import workload_for


class FederatedRun:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, echo: Callable[[str], None] = print,
                 resume: Path | None = None, results_root: Path | None = None) -> None:
        self.cfg, self.echo = cfg, echo
        self.nodes = Nodes(grid, cfg.strategy.round_timeout)  # holds the Grid (set later for a prepared run)
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
        self.stopped: str | None = None  # why the run ended before its last round, if it did
        self.results_root = results_root
        self.writer: ResultsWriter | None = None  # made once the clients' data is known to fit (run())
        if resume is not None:
            self.writer = ResultsWriter(cfg, resume_dir=resume)
            self._restore(resume)

    @property
    def grid(self) -> Grid:
        return self.nodes.grid

    @grid.setter
    def grid(self, grid: Grid) -> None:
        self.nodes.grid = grid

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

    def evaluate(self, rnd: int) -> dict[str, Any]:
        result = self.workload.evaluate(self.bundle, self.global_params, self.nodes.count(self.cfg.data.num_clients))
        if result.samples:
            self.writer.log_samples(rnd, result.samples)
        return result.metrics

    def evaluate_federated(self, rnd: int) -> dict[str, Any]:
        """Every client scores the global group plus its own local group on its own test data."""
        content = round_content(self.global_params, self.config_json, rnd, self.cfg.data.num_clients or 0)
        return self.workload.summarize_clients(self.nodes.evaluate(content, rnd))

    def available_nodes(self) -> list[int]:
        return self.nodes.available(self.cfg.strategy.min_clients)

    def _messages(self, sampled: list[int], rnd: int) -> list[Message]:
        content = round_content(self.global_params, self.config_json, rnd, self.cfg.data.num_clients or 0,
                                self.pipeline.downlink())
        return [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in sampled]

    def collect(self, rnd: int) -> Replies:
        """Sample clients, send them the global group, and take their replies (fedllm/apps/replies.py)."""
        identities = self.nodes.identities
        sampled = sample_clients(self.cfg.strategy, {n: identities[n] for n in self.available_nodes()}, self.rng)
        running = self.pipeline.running_sum(rnd)
        stack = None if running else torch.empty(len(sampled), self.pipeline.layout.numel, dtype=self.pipeline.stack_dtype)
        out = Replies(sampled, stack=stack,
                      row_order=sorted(sampled, key=lambda n: identities[n]), running=running)  # fusion's order
        return gather(self.grid, self._messages(sampled, rnd), out, self.pipeline.layout, self.pipeline.stat_layouts,
                      self.cfg.strategy.round_timeout, self.pipeline.outlier_ratio, rnd)

    def round_update(self, rnd: int, updates: list[ClientUpdate], running: RunningSum | None = None) -> dict[str, Any]:
        """The fusion pipeline on this round's usable updates (or their running sum); returns what to
        record of it."""
        self.global_params, record = self.pipeline(self.global_params, updates, self.cfg.seed + rnd,
                                                   population=len(self.nodes.identities), server_round=rnd,
                                                   running=running)
        return {**record, **training_record(updates)}

    def round(self, rnd: int) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.monotonic()
        replies = self.collect(rnd)
        updates = replies.updates
        record = {"round": rnd, **replies.record(self.nodes.identities, self.down_bytes, self.payload_bytes)}
        if len(updates) < cfg.strategy.min_clients:
            self.echo(f"[round {rnd}/{cfg.rounds}] skipped: {len(updates)} usable replies < strategy.min_clients="
                      f"{cfg.strategy.min_clients}")
            record["skipped"] = True
        else:
            record.update(self.round_update(rnd, updates, replies.running))
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
        return run_summary(self.cfg, self.workload.metric, self.writer.records, self.totals, self.payload_bytes,
                           self.stopped)

    def run(self) -> Path:
        cfg, m = self.cfg, self.workload.metric
        # who is who, asked once before anything is written (its cost is the clients' start-up, not a
        # round's); under flwr run the nodes say how many partitions the data is split into, which
        # must fit the data before training starts and before a results folder exists
        self.available_nodes()
        if not cfg.data.num_clients and self.nodes.declared_partitions:
            self.workload.check_data(self.nodes.declared_partitions)
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
