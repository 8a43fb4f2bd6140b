"""ClientApp: thin Flower glue around :func:`train_round` (plain PyTorch underneath).

A client restores the global group from the message and its local group from
``context.state`` (kept across rounds by Flower), trains with its trainer from
``clients/``, stores the local group back, and replies with only the delta of the
global group plus its metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import TRAINERS, TrainContext, client_seed
from fedllm.faults import apply_fault
from fedllm.config import ExperimentConfig, config_from_json
from fedllm.data import Examples, TaskSuite, client_examples, load_suite, local_examples
from fedllm.metrics import evaluate_tasks
from fedllm.instructions import Instruction
from fedllm.models import ModelBundle, cached_bundle
from fedllm.pfit import client_preference, client_prompts, evaluate_policy, preferences_of
from fedllm.policy import cached_policy
from fedllm.payload import CONFIG, GLOBAL, METRICS, NUM_EXAMPLES, reply_content
from fedllm.vectors import get_tensors, set_tensors, subtract

LOCAL_STATE = "fedllm.local"
ROUNDS_STATE = "fedllm.rounds"

app = ClientApp()


def _partition(context: Context, config: dict) -> tuple[int, int]:
    """(partition id, number of partitions); a device with its own data has no partition: (-1, 0)."""
    node_config = context.node_config
    if "partition-id" not in node_config:
        if node_config.get("data-path"):
            return -1, 0
        raise ValueError("node config lacks 'partition-id' or 'data-path' (start the SuperNode with "
                         "--node-config 'partition-id=0 num-partitions=N' or --node-config 'data-path=/my/data.jsonl')")
    num = int(config.get("num-partitions") or node_config.get("num-partitions", 0))
    return int(node_config["partition-id"]), num


@dataclass
class ClientRound:
    """What one client call works with, prepared once: config, data, model, partition."""

    cfg: ExperimentConfig
    suite: TaskSuite | None  # None for RL instruction tuning (prompts, not labelled examples)
    bundle: ModelBundle
    examples: Examples | list[Instruction]
    server_round: int
    partition_id: int  # -1 for a device with its own data
    num_partitions: int


def _prepare(content: RecordDict, context: Context) -> ClientRound:
    config = dict(content.config_records[CONFIG])
    cfg = config_from_json(str(config["experiment"]))
    partition_id, num_partitions = _partition(context, config)
    if cfg.rl is not None:
        bundle = cached_policy(cfg)
        if partition_id < 0:
            raise ValueError("RL instruction tuning reads its prompts from rl.prompts; start the SuperNode with "
                             "--node-config 'partition-id=P num-partitions=N'")
        _restore(bundle, content, context)
        prompts = client_prompts(cfg, partition_id, num_partitions)
        return ClientRound(cfg, None, bundle, prompts, int(config.get("round", 0)), partition_id, num_partitions)
    suite = load_suite(cfg.data, cfg.seed)
    bundle = cached_bundle(cfg, suite.label_names)
    data_path = context.node_config.get("data-path")
    if data_path:  # a real device with its own data
        task = context.node_config.get("task")
        examples = local_examples(suite, str(data_path), str(task) if task else None)
    else:
        examples = client_examples(cfg.data, partition_id, num_partitions, cfg.seed)
    _restore(bundle, content, context)
    return ClientRound(cfg, suite, bundle, examples, int(config.get("round", 0)), partition_id, num_partitions)


def _restore(bundle: ModelBundle, content: RecordDict, context: Context) -> None:
    """Global group from the message, local group from this client's state (or its initial value)."""
    set_tensors(bundle.model, content.array_records[GLOBAL].to_torch_state_dict())
    local = context.state.array_records.get(LOCAL_STATE)
    set_tensors(bundle.model, local.to_torch_state_dict() if local is not None else bundle.initial_local)


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
    ctx = TrainContext(cfg.client, job.suite.label_ranges if job.suite else [], cfg.model.max_length,
                       seed=client_seed(cfg.seed, job.server_round, int(context.node_config.get("partition-id", 0))),
                       anchor=before if cfg.client.prox_mu > 0 else None,
                       preference=client_preference(cfg.rl, job.partition_id, cfg.seed) if cfg.rl else None, rl=cfg.rl)
    started = time.perf_counter()
    result = TRAINERS.get(cfg.client.trainer)(bundle, job.examples, ctx)
    train_time = time.perf_counter() - started
    local_norm = 0.0
    if bundle.groups.local_names:
        local = get_tensors(bundle.model, bundle.groups.local_names)
        context.state[LOCAL_STATE] = ArrayRecord(torch_state_dict=local)
        local_norm = float(sum(t.double().pow(2).sum() for t in local.values()) ** 0.5)
    delta = subtract(get_tensors(bundle.model, bundle.groups.global_names), before)
    own_tasks = set(job.examples.tasks) if isinstance(job.examples, Examples) else set()
    metrics = {"train_loss": result.loss, "steps": result.steps, NUM_EXAMPLES: len(job.examples),
               "task": own_tasks.pop() if len(own_tasks) == 1 else -1, "local_norm": local_norm,
               "local_rounds": _count_rounds(context), "train_time": train_time, **result.extra}
    if job.partition_id >= 0:
        metrics["partition"] = job.partition_id
    for fault in cfg.client.faults:
        if fault.hits(job.partition_id, job.num_partitions, cfg.seed):
            delta = apply_fault(fault, delta, metrics, seed=ctx.seed)
    return reply_content(delta, metrics)


def evaluate_round(content: RecordDict, context: Context) -> RecordDict:
    """Personalised evaluation: global group from the server, local group from the client state,
    on the client's own test partition (a device with its own data: the run's test split of its tasks)."""
    job = _prepare(content, context)
    cfg = job.cfg
    if cfg.rl is not None:  # this client's policy under every client's preference: its row of the matrix
        scores = evaluate_policy(job.bundle, cfg, preferences_of(cfg, job.num_partitions), samples=0)
        metrics = {"reward": scores.per_preference[job.partition_id], "kl": scores.kl, "partition": job.partition_id,
                   NUM_EXAMPLES: len(job.examples),
                   **{f"reward/p{j}": r for j, r in enumerate(scores.per_preference)},
                   **{f"score/{k}": v for k, v in scores.per_reward.items()}}
        return RecordDict({METRICS: MetricRecord(metrics)})
    if job.partition_id >= 0:
        test = client_examples(cfg.data, job.partition_id, job.num_partitions, cfg.seed, split="test")
    else:
        pooled, mine = job.suite.split("test"), set(job.examples.tasks)
        test = pooled.subset([i for i, t in enumerate(pooled.tasks) if t in mine])
    scores = evaluate_tasks(job.bundle, job.bundle.model, job.suite, test, cfg.eval.batch_size, cfg.model.max_length)
    metrics = {"accuracy": scores["accuracy"], "eval_loss": scores["eval_loss"], NUM_EXAMPLES: len(test)}
    if job.partition_id >= 0:
        metrics["partition"] = job.partition_id
    return RecordDict({METRICS: MetricRecord(metrics)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(train_round(msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(evaluate_round(msg.content, context), reply_to=msg)
