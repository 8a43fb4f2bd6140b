"""One client call: the work behind the ClientApp's train and evaluate handlers (fedllm/apps/client_app.py).

A client restores the global group from the message and its local group from
``context.state`` (kept across rounds by Flower), trains with its trainer from
``fedllm.clients``, stores the local group back, and replies with only the delta of the
global group plus its metrics.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sized
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedllm.apps.client_app import partition_of
from fedllm.apps.fingerprint import code_fingerprint, code_location
from fedllm.apps.payload import CONFIG, DOWN, GLOBAL, METRICS, NUM_EXAMPLES, RAY_NODE, reply_content
from fedllm.clients import TRAINERS, client_seed
from fedllm.config import ConfigError, ExperimentConfig, config_from_json
from fedllm.core.bundle import ModelBundle
from fedllm.core.faults import apply_fault
from fedllm.core.lora_ranks import RANK_METRIC, client_rank, rank_config, truncate_to
from fedllm.core.vectors import get_tensors, set_tensors, subtract
from fedllm.strategies import build_rule
from fedllm.workloads import Workload, workload_for

LOCAL_STATE = "fedllm.local"
KEPT = "fedllm.kept."  # + a name: what a trainer keeps across rounds (e.g. SCAFFOLD's control variate)
ROUNDS_STATE = "fedllm.rounds"


@dataclass
class ClientRound:
    """What one client call works with, prepared once: config, workload, model, data, partition."""

    cfg: ExperimentConfig
    workload: Workload
    bundle: ModelBundle
    data: Sized
    server_round: int
    partition_id: int  # -1 for a device with its own data
    num_partitions: int
    rank: int | None = None  # its LoRA rank (None: not LoRA)


def check_same_code(config: dict) -> None:
    """Refuse to train with other fedllm code than the server's (fedllm/core/fingerprint.py)."""
    theirs = config.get("code")
    if theirs and theirs != code_fingerprint():
        raise ConfigError(f"this client runs fedllm from {code_location()} (code {code_fingerprint()}), not the "
                          f"server's (code {theirs}, from {config.get('code-location', '?')}): a stale copy is "
                          "importable first (a SuperLink or SuperNode started from another checkout, or an old "
                          "install); start it from the submitted app, or reinstall")


def _prepare(content: RecordDict, context: Context) -> ClientRound:
    config = dict(content.config_records[CONFIG])
    check_same_code(config)
    partition_id, num_partitions = partition_of(context, config)
    cfg = config_from_json(str(config["experiment"]))
    rank = client_rank(cfg.peft, partition_id, context.node_config) if cfg.peft.method == "lora" else None
    if rank is not None:  # a device of lower LoRA rank builds its model at that rank (fedllm/core/lora_ranks.py)
        cfg = rank_config(cfg, rank)
    workload = workload_for(cfg)
    bundle = workload.cached_model()
    data = workload.client_data(partition_id, num_partitions, context.node_config)
    _restore(bundle, content, context)
    return ClientRound(cfg, workload, bundle, data, int(config.get("round", 0)), partition_id, num_partitions, rank)


def _restore(bundle: ModelBundle, content: RecordDict, context: Context) -> None:
    """Global group from the message (its first LoRA components, at a lower rank), local group from this
    client's state (or its initial value)."""
    shapes = {name: tuple(p.shape) for name, p in bundle.model.named_parameters()}
    set_tensors(bundle.model, truncate_to(content.array_records[GLOBAL].to_torch_state_dict(), shapes))
    local = context.state.array_records.get(LOCAL_STATE)
    set_tensors(bundle.model, local.to_torch_state_dict() if local is not None else bundle.initial_local)


def ray_node() -> int | None:
    """The Ray node this client runs on, in a simulation (None elsewhere): shows where a cluster put it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return int(ray.get_runtime_context().get_node_id()[:12], 16)


def _count_rounds(context: Context) -> int:
    """How many rounds this client's state has seen, this one included (kept in context.state)."""
    seen = context.state.config_records.get(ROUNDS_STATE)
    rounds_here = int(seen["n"]) + 1 if seen is not None else 1
    context.state[ROUNDS_STATE] = ConfigRecord({"n": rounds_here})
    return rounds_here


def train_round(content: RecordDict, context: Context) -> RecordDict:
    """One client round: returns the reply content (delta of the global group + metrics)."""
    job = _prepare(content, context)
    cfg, bundle = job.cfg, job.bundle
    before = get_tensors(bundle.model, bundle.groups.global_names)
    seed = client_seed(cfg.seed, job.server_round, int(context.node_config.get("partition-id", 0)))
    ctx = job.workload.train_context(job.data, job.partition_id, seed, before if cfg.client.prox_mu > 0 else None)
    ctx.incoming = {k.removeprefix(DOWN): v.to_torch_state_dict() for k, v in content.array_records.items()
                    if k.startswith(DOWN)}
    ctx.kept = {k.removeprefix(KEPT): v.to_torch_state_dict() for k, v in context.state.array_records.items()
                if k.startswith(KEPT)}
    started = time.perf_counter()
    result = TRAINERS.get(cfg.client.trainer)(bundle, job.data, ctx)
    train_time = time.perf_counter() - started
    for name, tensors in result.keep.items():  # e.g. SCAFFOLD's own control variate, for the next round
        context.state[KEPT + name] = ArrayRecord(torch_state_dict=tensors)
    local_norm = 0.0
    if bundle.groups.local_names:
        local = get_tensors(bundle.model, bundle.groups.local_names)
        context.state[LOCAL_STATE] = ArrayRecord(torch_state_dict=local)
        local_norm = float(sum(t.double().pow(2).sum() for t in local.values()) ** 0.5)
    delta = subtract(get_tensors(bundle.model, bundle.groups.global_names), before)
    metrics = {"train_loss": result.loss, "steps": result.steps, NUM_EXAMPLES: len(job.data), "task": -1,
               **job.workload.data_metrics(job.data), "local_norm": local_norm,
               "local_rounds": _count_rounds(context), "train_time": train_time, **result.extra}
    if job.partition_id >= 0:
        metrics["partition"] = job.partition_id
    if job.rank is not None:
        metrics[RANK_METRIC] = job.rank
    node = ray_node()
    if node is not None:
        metrics[RAY_NODE] = node
    for fault in cfg.client.faults:
        if fault.hits(job.partition_id, job.num_partitions, cfg.seed):
            delta = apply_fault(fault, delta, metrics, seed=ctx.seed)
    # what the fusion rule fuses with besides the update (a Fisher, Gram matrices), of the trained model
    requested = build_rule(cfg.strategy.name, cfg.strategy.params()).client_statistics()
    stats = {name: t for name, t in result.statistics.items() if name in requested}  # the trainer's own
    rest = {name: settings for name, settings in requested.items() if name not in stats}
    if rest:
        stats.update(job.workload.client_statistics(bundle, job.data, rest, bundle.groups.global_names))
    return reply_content(delta, metrics, stats)


def evaluate_round(content: RecordDict, context: Context) -> RecordDict:
    """Personalised evaluation: global group from the server, local group from the client state."""
    job = _prepare(content, context)
    result = job.workload.evaluate_client(job.bundle, job.data, job.partition_id, job.num_partitions,
                                          context.node_config)
    metrics = {**result.metrics, NUM_EXAMPLES: result.num_examples}
    if job.partition_id >= 0:
        metrics["partition"] = job.partition_id
    return RecordDict({METRICS: MetricRecord(metrics)})
