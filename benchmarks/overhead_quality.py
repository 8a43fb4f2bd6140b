"""What federation costs and what it gives up: the same FedAvg-LoRA training through Flower's
simulation vs a plain loop in one process, and vs centralised training on the pooled data.

    python benchmarks/overhead_quality.py [--clients 4 20] [--rounds 3] [--steps 20] [--repeats 3]
        [--out results/benchmarks/overhead_quality.json]

1. Federated: ``fedllm run experiments/fedavg_lora.yaml`` (MiniLM + LoRA r=8) in a fresh process,
   evaluation only after the last round (and the server's round-0 baseline).
2. Plain loop: one process builds the model once and, each round, trains every client's
   partition in turn with the same trainer, seeds and steps, then averages: the same algorithm
   with no Flower, Ray, messages or processes. Its accuracy should equal the federated one.
3. Centralised: the same model and trainer on the pooled training data for the same total
   number of steps (clients x rounds x steps): the quality upper bound at this budget.
Times are min/median over ``--repeats``; the overhead is the federated process's wall time over
the plain loop's (model build + training + final evaluation). Where the rest goes comes from the
federated run's records: process start to round 1 (imports, Ray, model build, round-0
evaluation), the slowest client's training per round, and the server's evaluation.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _runs import REPO, fedllm_run, save_and_print, stats  # noqa: E402
from fedllm.clients import TRAINERS, TrainContext, client_seed  # noqa: E402

from fedllm.config import load_config  # noqa: E402
from fedllm.core.vectors import get_tensors, set_tensors  # noqa: E402
from fedllm.workloads.classification.data import client_examples, load_suite  # noqa: E402
from fedllm.workloads.classification.metrics import evaluate_tasks  # noqa: E402
from fedllm.workloads.classification.models import build_bundle  # noqa: E402


def overrides(rounds: int, steps: int) -> list[str]:
    return [f"rounds={rounds}", f"client.max_steps={steps}", "eval.every=1000"]


def plain_loop(cfg, clients: int) -> tuple[float, float, int, list[float]]:
    """FedAvg with the federated run's trainer and seeds, in one process: (seconds, accuracy,
    training steps taken, which a small partition caps below client.max_steps, seconds per round)."""
    start = time.perf_counter()
    suite = load_suite(cfg.data, cfg.seed)
    bundle = build_bundle(cfg, suite.label_names)
    names = bundle.groups.global_names
    global_params = dict(bundle.initial_global)
    parts = [client_examples(cfg.data, c, clients, cfg.seed) for c in range(clients)]
    steps = 0
    round_times = []
    for rnd in range(1, cfg.rounds + 1):
        round_start = time.perf_counter()
        total = {n: torch.zeros_like(t) for n, t in global_params.items()}
        count = 0
        for c, examples in enumerate(parts):
            set_tensors(bundle.model, global_params)
            set_tensors(bundle.model, bundle.initial_local)
            ctx = TrainContext(cfg.client, suite.label_ranges, cfg.model.max_length,
                               seed=client_seed(cfg.seed, rnd, c))
            steps += TRAINERS.get(cfg.client.trainer)(bundle, examples, ctx).steps
            trained = get_tensors(bundle.model, names)
            for n in names:
                total[n] += len(examples) * (trained[n] - global_params[n])
            count += len(examples)
        global_params = {n: global_params[n] + total[n] / count for n in names}
        round_times.append(time.perf_counter() - round_start)
    set_tensors(bundle.model, global_params)
    acc = evaluate_tasks(bundle, bundle.model, suite, suite.split("test"), cfg.eval.batch_size,
                         cfg.model.max_length)["accuracy"]
    return time.perf_counter() - start, acc, steps, round_times


def centralised(cfg, total_steps: int) -> tuple[float, float]:
    start = time.perf_counter()
    suite = load_suite(cfg.data, cfg.seed)
    bundle = build_bundle(cfg, suite.label_names)
    section = cfg.client.model_copy(update={"max_steps": total_steps, "local_epochs": 1000})
    TRAINERS.get(cfg.client.trainer)(bundle, suite.split("train"),
                                     TrainContext(section, suite.label_ranges, cfg.model.max_length, seed=cfg.seed))
    acc = evaluate_tasks(bundle, bundle.model, suite, suite.split("test"), cfg.eval.batch_size,
                         cfg.model.max_length)["accuracy"]
    return time.perf_counter() - start, acc


def measure(clients: int, rounds: int, steps: int, repeats: int) -> dict:
    cfg = load_config(REPO / "experiments" / "fedavg_lora.yaml", overrides(rounds, steps))
    fed, loop, central = [], [], []
    for _ in range(repeats):
        fed.append(fedllm_run("experiments/fedavg_lora.yaml", overrides(rounds, steps), clients))
        loop.append(plain_loop(cfg, clients))
        central.append(centralised(cfg, loop[-1][2]))  # the same number of steps, on pooled data
    walls = [f["wall"] for f in fed]
    best = fed[walls.index(statistics.median(walls))] if repeats % 2 else fed[walls.index(min(walls))]
    recs = best["records"][1:]
    rounds_s = sum(r["round_time"] for r in recs)
    breakdown = {
        "process_start_to_round_1_s": best["wall"] - best["summary"]["wall_time"],
        "rounds_s": rounds_s,
        "slowest_client_training_s": sum(r.get("client_train_time_max", 0.0) for r in recs),
        "all_client_training_s": sum(r.get("client_train_time_mean", 0.0) * r["clients_used"] for r in recs),
        "server_evaluation_s": sum(r.get("eval_time", 0.0) for r in recs),
    }
    # 2 cores: Ray runs 2 clients at a time, so the training share of a round is the total client
    # training over the workers, not the slowest client.
    workers = min(clients, os.cpu_count() or 1)
    breakdown["client_training_per_worker_s"] = breakdown["all_client_training_s"] / workers
    breakdown["rest_of_rounds_s"] = rounds_s - breakdown["client_training_per_worker_s"] - breakdown["server_evaluation_s"]
    # Once running: a round after the first (Ray workers import torch/transformers and build the model
    # on their first message) vs a plain-loop round; what is left is a fixed cost per run.
    breakdown["round_1_s"] = recs[0]["round_time"]
    steady = statistics.median(r["round_time"] - r.get("eval_time", 0.0) for r in recs[1:]) if len(recs) > 1 else float("nan")
    plain_round = statistics.median(t for _, _, _, rounds in loop for t in rounds)
    fed_fixed = statistics.median(walls) - rounds * steady
    plain_fixed = statistics.median(t for t, _, _, _ in loop) - rounds * plain_round
    per_round = {"federated_round_s": steady, "plain_round_s": plain_round, "ratio": steady / plain_round,
                 "federated_fixed_s": fed_fixed, "plain_fixed_s": plain_fixed}
    # rounds from which the whole run is within 15% / 30% of the plain loop (None: never)
    for goal in (1.15, 1.30):
        room = goal * plain_round - steady
        per_round[f"rounds_to_{round(100 * (goal - 1))}pct"] = (max(1, math.ceil((fed_fixed - goal * plain_fixed) / room))
                                                              if room > 0 else None)
    fed_acc, loop_acc, central_acc = (best["summary"]["final_accuracy"], statistics.median(a for _, a, _, _ in loop),
                                      statistics.median(a for _, a in central))
    return {
        "clients": clients, "rounds": rounds, "steps": steps, "repeats": repeats,
        "federated_wall_s": stats(walls), "plain_loop_s": stats([t for t, _, _, _ in loop]),
        "centralised_s": stats([t for t, _ in central]),
        "overhead_ratio": statistics.median(walls) / statistics.median(t for t, _, _, _ in loop),
        "overhead_rounds_only_ratio": rounds_s / statistics.median(t for t, _, _, _ in loop),
        "breakdown": breakdown, "per_round": per_round,
        "federated_accuracy": fed_acc, "plain_loop_accuracy": loop_acc, "centralised_accuracy": central_acc,
        "quality_ratio": fed_acc / central_acc, "total_steps": loop[0][2],
    }


def markdown(result: dict) -> str:
    return "\n".join(markdown_one(r) for r in result["runs"])


def markdown_one(r: dict) -> str:
    b = r["breakdown"]
    return "\n".join([
        f"FedAvg-LoRA (MiniLM, {r['clients']} clients, {r['rounds']} rounds x {r['steps']} steps), "
        f"median (min) of {r['repeats']}:", "",
        "| | wall s | accuracy |", "| --- | --- | --- |",
        f"| federated (fedllm run, fresh process) | {r['federated_wall_s']['median']:.1f} "
        f"({r['federated_wall_s']['min']:.1f}) | {r['federated_accuracy']:.4f} |",
        f"| plain loop, same algorithm | {r['plain_loop_s']['median']:.1f} ({r['plain_loop_s']['min']:.1f}) "
        f"| {r['plain_loop_accuracy']:.4f} |",
        f"| centralised, pooled data, same {r['total_steps']} steps | {r['centralised_s']['median']:.1f} "
        f"({r['centralised_s']['min']:.1f}) | {r['centralised_accuracy']:.4f} |", "",
        f"Overhead: federated / plain loop = {r['overhead_ratio']:.2f} (rounds only: "
        f"{r['overhead_rounds_only_ratio']:.2f}); quality: federated / centralised = {r['quality_ratio']:.3f}. "
        f"Federated time: {b['process_start_to_round_1_s']:.1f} s start (imports, Ray, model, round-0 eval), "
        f"{b['rounds_s']:.1f} s rounds = {b['client_training_per_worker_s']:.1f} s client training per worker "
        f"({b['all_client_training_s']:.1f} s in all) + {b['server_evaluation_s']:.1f} s server evaluation + "
        f"{b['rest_of_rounds_s']:.1f} s the rest (messages, serialisation, fusion, worker scheduling; round 1 "
        f"alone {b.get('round_1_s', float('nan')):.1f} s, as each Ray worker imports torch and transformers and builds "
        f"the model on its first message).", ""] + per_round_line(r.get("per_round")))


def per_round_line(p: dict | None) -> list[str]:
    if not p:
        return []
    reach = ", ".join(f"{goal}% from {p[f'rounds_to_{goal}pct']} rounds" if p[f"rounds_to_{goal}pct"] else f"{goal}% never"
                      for goal in (15, 30))
    return [f"Per round once running: federated {p['federated_round_s']:.2f} s vs plain loop {p['plain_round_s']:.2f} s "
            f"(ratio {p['ratio']:.2f}); fixed cost per run {p['federated_fixed_s']:.1f} s vs {p['plain_fixed_s']:.1f} s. "
            f"Whole-run overhead within {reach}.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 20])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/overhead_quality.json"))
    args = parser.parse_args()
    result = {"runs": [measure(n, args.rounds, args.steps, args.repeats) for n in args.clients]}
    save_and_print(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
