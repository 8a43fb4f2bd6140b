"""What federation costs and what it gives up: the same training through Flower's simulation vs a
plain loop in one process, and vs centralised training on the pooled data.

    python benchmarks/overhead_quality.py [--experiment experiments/fedavg_lora.yaml] [--set KEY=VALUE]
        [--clients 4 20] [--rounds 3] [--steps 20] [--repeats 3] [--no-centralised]
        [--out results/benchmarks/overhead_quality.json]

Any workload: e.g. GRPO on SmolLM2 with ``--experiment experiments/pfit/smollm2/pfit.yaml
--set 'channel={kind: ideal}' --clients 2 --rounds 3 --steps 4 --repeats 1 --no-centralised``.

1. Federated: ``fedllm run <experiment>`` (default FedAvg-LoRA on MiniLM) in a fresh process,
   evaluation only after the last round (and the server's round-0 baseline), no federated evaluation.
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
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _runs import REPO, fedllm_run, offline_env, save_and_print, stats  # noqa: E402
from fedllm.clients import TRAINERS, client_seed  # noqa: E402

from fedllm.config import load_config  # noqa: E402
from fedllm.core.types import ClientUpdate  # noqa: E402
from fedllm.core.vectors import flatten, get_tensors, set_tensors, subtract  # noqa: E402
from fedllm.fusion.pipeline import FusionPipeline  # noqa: E402
from fedllm.workloads import workload_for  # noqa: E402


def overrides(rounds: int, steps: int, extra: list[str], clients: int) -> list[str]:
    """Both sides get the same number of clients, also where the experiment fixes data.num_clients."""
    return [*extra, f"rounds={rounds}", f"client.max_steps={steps}", f"data.num_clients={clients}", "eval.every=1000",
            "eval.federated=false"]


def plain_loop(cfg, clients: int) -> tuple[float, float, int, list[float]]:
    """The federated run's algorithm with its trainer, seeds, channel and fusion rule, in one process,
    through the same Workload interface and FusionPipeline the apps use (so it serves every workload
    and rule that fuses the sent group itself): each round every client trains in turn from the global
    part and its own kept local part, and the pipeline fuses their deltas. Returns (seconds, the
    workload's metric, training steps taken, which a small partition caps below client.max_steps,
    seconds per round)."""
    start = time.perf_counter()
    workload = workload_for(cfg)
    bundle = workload.build_model()
    pipeline = FusionPipeline(cfg, workload, bundle)
    if pipeline.lora is not None or pipeline.stat_layouts or pipeline.downlink():
        raise SystemExit(f"{cfg.strategy.name}: the plain loop runs rules that fuse the sent deltas alone (no LoRA "
                         "products, client statistics or downlink state)")
    names, local_names = bundle.groups.global_names, bundle.groups.local_names
    global_params = pipeline.initial_global()
    parts = [workload.client_data(c, clients, {}) for c in range(clients)]
    local = [dict(bundle.initial_local) for _ in range(clients)]
    steps = 0
    round_times = []
    for rnd in range(1, cfg.rounds + 1):
        round_start = time.perf_counter()
        updates = []
        for c, data in enumerate(parts):
            set_tensors(bundle.model, global_params)
            set_tensors(bundle.model, local[c])
            anchor = global_params if cfg.client.prox_mu > 0 else None
            ctx = workload.train_context(data, c, client_seed(cfg.seed, rnd, c), anchor)
            result = TRAINERS.get(cfg.client.trainer)(bundle, data, ctx)
            steps += result.steps
            delta = subtract(get_tensors(bundle.model, names), global_params)
            local[c] = get_tensors(bundle.model, local_names)
            updates.append(ClientUpdate(c, flatten(delta, pipeline.layout), len(data),
                                        {"train_loss": result.loss, "partition": c}))
        global_params, _ = pipeline(global_params, updates, cfg.seed + rnd, population=clients, server_round=rnd)
        round_times.append(time.perf_counter() - round_start)
    score = workload.evaluate(bundle, global_params, clients).metrics[workload.metric]
    return time.perf_counter() - start, score, steps, round_times


def centralised(cfg, total_steps: int) -> tuple[float, float]:
    """The same trainer on the pooled data (one partition of everything) for the same number of steps."""
    start = time.perf_counter()
    workload = workload_for(cfg)
    bundle = workload.build_model()
    section = cfg.client.model_copy(update={"max_steps": total_steps, "local_epochs": 1000})
    pooled = workload.client_data(0, 1, {})
    ctx = workload.train_context(pooled, 0, cfg.seed, None)
    TRAINERS.get(cfg.client.trainer)(bundle, pooled, replace(ctx, section=section))
    score = workload.evaluate(bundle, get_tensors(bundle.model, bundle.groups.global_names), 1).metrics[workload.metric]
    return time.perf_counter() - start, score


def plain_loop_program(experiment: str, extra: list[str], clients: int, rounds: int, steps: int
                       ) -> tuple[float, float, int, list[float], float]:
    """The plain loop as a program of its own, as a user would run it: a fresh interpreter that
    imports what it needs, runs :func:`plain_loop` and exits. Returns plain_loop's values and the
    program's wall time (what ``fedllm run``'s process wall compares with on the same footing)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-loop-child", "--experiment", experiment,
           "--clients", str(clients), "--rounds", str(rounds), "--steps", str(steps),
           *[a for o in extra for a in ("--set", o)]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"plain loop failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    seconds, score, steps_taken, round_times = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, score, steps_taken, round_times, wall


SUPERLINK = "flower-superlink --insecure --simulation"  # the local SuperLink `flwr run .` starts


def flwr_run_program(experiment: str, extra: list[str], clients: int, rounds: int, steps: int) -> tuple[float, float]:
    """The README's ``flwr run . --stream`` with ``clients`` simulated SuperNodes of one core each (as
    ``fedllm run`` gives its clients; Flower's default is 2, one client at a time on 2 cores) and the same settings
    (``experiment`` and the overrides passed as the app's run config). Returns its wall time and the
    run's final metric. The first such command also starts Flower's local SuperLink, which stays."""
    over = overrides(rounds, steps, extra, clients)
    bad = [o for o in over if "'" in o or any(c.isspace() for c in o)]
    if bad:
        raise SystemExit(f"--flwr-run: {bad} cannot pass through flwr run's run config (space-separated, "
                         "single-quoted): drop --flwr-run or write the override without spaces or quotes")
    results = Path(tempfile.mkdtemp(prefix="fedllm-flwr-run-"))
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "--stream",
           "--federation-config", f"num-supernodes={clients} client-resources-num-cpus=1",  # as fedllm run's clients
           "--run-config", f"experiment='{experiment}' overrides='{' '.join(over)}' results-dir='{results}'"]
    env = offline_env()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    summaries = list(results.rglob("summary.json"))  # flwr run exits 0 even when the run failed
    if proc.returncode != 0 or not summaries:
        raise RuntimeError(f"flwr run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    summary = json.loads(summaries[0].read_text())
    metric = next(v for k, v in summary.items() if k.startswith("final_") and isinstance(v, (int, float)))
    return wall, metric


def _superlinks() -> set[int]:
    found = subprocess.run(["pgrep", "-f", SUPERLINK], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


def measure(experiment: str, extra: list[str], clients: int, rounds: int, steps: int, repeats: int,
            with_centralised: bool = True, with_flwr_run: bool = False) -> dict:
    cfg = load_config(REPO / experiment, overrides(rounds, steps, extra, clients))
    metric = workload_for(cfg).metric
    fed, loop, central, programs, flwr_runs = [], [], [], [], []
    superlinks_before = _superlinks() if with_flwr_run else set()
    for _ in range(repeats):
        fed.append(fedllm_run(experiment, overrides(rounds, steps, extra, clients), clients))
        *in_loop, program_wall = plain_loop_program(experiment, extra, clients, rounds, steps)
        loop.append(tuple(in_loop))
        programs.append(program_wall)
        if with_flwr_run:
            flwr_runs.append(flwr_run_program(experiment, extra, clients, rounds, steps))
        if with_centralised:
            central.append(centralised(cfg, loop[-1][2]))  # the same number of steps, on pooled data
    if with_flwr_run:
        for pid in _superlinks() - superlinks_before:  # the SuperLink this benchmark started goes again
            os.kill(pid, 15)
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
    # fedllm's own steps on the server (sending, checking replies, channel, fusion, merge, checkpoints):
    # what the framework adds to a round besides training, Flower's transport and evaluation
    phases = best["summary"].get("phase_times", {})
    own = {k: v for k, v in phases.items() if k not in ("wait_for_clients", "slowest_client_training", "evaluation")}
    breakdown["fedllm_steps_s"] = own
    breakdown["fedllm_share_of_rounds"] = sum(own.values()) / rounds_s if rounds_s else float("nan")
    # Once running: a round after the first (Ray workers import torch/transformers and build the model
    # on their first message) vs a plain-loop round; what is left is a fixed cost per run.
    breakdown["round_1_s"] = recs[0]["round_time"]
    steady = statistics.median(r["round_time"] - r.get("eval_time", 0.0) for r in recs[1:]) if len(recs) > 1 else float("nan")
    plain_round = statistics.median(t for _, _, _, rounds in loop for t in rounds)
    plain_round_1 = statistics.median(rounds[0] for _, _, _, rounds in loop)
    fed_fixed = statistics.median(walls) - rounds * steady
    plain_fixed = statistics.median(t for t, _, _, _ in loop) - rounds * plain_round
    per_round = {"federated_round_s": steady, "plain_round_s": plain_round, "ratio": steady / plain_round,
                 "round_1_ratio": recs[0]["round_time"] / plain_round_1,
                 "federated_fixed_s": fed_fixed, "plain_fixed_s": plain_fixed}
    # rounds from which the whole run is within 15% / 30% of the plain loop (None: never)
    for goal in (1.15, 1.30):
        room = goal * plain_round - steady
        per_round[f"rounds_to_{round(100 * (goal - 1))}pct"] = (max(1, math.ceil((fed_fixed - goal * plain_fixed) / room))
                                                              if room > 0 else None)
    fed_acc, loop_acc = best["summary"][f"final_{metric}"], statistics.median(a for _, a, _, _ in loop)
    central_acc = statistics.median(a for _, a in central) if central else float("nan")
    return {
        "experiment": experiment, "overrides": extra, "metric": metric, "clients": clients, "rounds": rounds, "steps": steps, "repeats": repeats,
        "federated_wall_s": stats(walls), "plain_loop_s": stats([t for t, _, _, _ in loop]),
        "centralised_s": stats([t for t, _ in central]) if central else None,
        "overhead_ratio": statistics.median(walls) / statistics.median(t for t, _, _, _ in loop),
        # both as programs: fedllm run's process against the loop's (imports, model, training, evaluation)
        "plain_loop_program_s": stats(programs),
        "overhead_vs_program_ratio": statistics.median(walls) / statistics.median(programs),
        "overhead_rounds_only_ratio": rounds_s / statistics.median(t for t, _, _, _ in loop),
        # flwr run . (the README's Run command) against the loop as a program; the first repeat also
        # started the local SuperLink when none was running
        **({"flwr_run_s": stats([w for w, _ in flwr_runs]), "flwr_run_first_s": flwr_runs[0][0],
            "flwr_run_vs_program_ratio": statistics.median(w for w, _ in flwr_runs) / statistics.median(programs),
            "flwr_run_accuracy": statistics.median(a for _, a in flwr_runs)} if flwr_runs else {}),
        "breakdown": breakdown, "per_round": per_round,
        "federated_accuracy": fed_acc, "plain_loop_accuracy": loop_acc, "centralised_accuracy": central_acc,
        "quality_ratio": fed_acc / central_acc, "total_steps": loop[0][2],
    }


def markdown(result: dict) -> str:
    return "\n".join(markdown_one(r) for r in result["runs"])


def markdown_one(r: dict) -> str:
    b = r["breakdown"]
    return "\n".join([
        f"{r.get('experiment', 'experiments/fedavg_lora.yaml')} {' '.join(r.get('overrides', []))} "
        f"({r['clients']} clients, {r['rounds']} rounds x {r['steps']} steps), median (min) of {r['repeats']}:", "",
        f"| | wall s | {r.get('metric', 'accuracy')} |", "| --- | --- | --- |",
        f"| federated (fedllm run, fresh process) | {r['federated_wall_s']['median']:.1f} "
        f"({r['federated_wall_s']['min']:.1f}) | {r['federated_accuracy']:.4f} |",
        f"| plain loop, same algorithm (its timed part: model, loop, evaluation) | {r['plain_loop_s']['median']:.1f} ({r['plain_loop_s']['min']:.1f}) "
        f"| {r['plain_loop_accuracy']:.4f} |",
        *([f"| plain loop as a program (fresh process: imports, model, loop, evaluation) | "
           f"{r['plain_loop_program_s']['median']:.1f} ({r['plain_loop_program_s']['min']:.1f}) | |"]
          if "plain_loop_program_s" in r else []),
        *([f"| flwr run . --stream (local SuperLink; first of the repeats {r['flwr_run_first_s']:.1f} s) | "
           f"{r['flwr_run_s']['median']:.1f} ({r['flwr_run_s']['min']:.1f}) | {r['flwr_run_accuracy']:.4f} |"]
          if "flwr_run_s" in r else []),
        *([f"| centralised, pooled data, same {r['total_steps']} steps | {r['centralised_s']['median']:.1f} "
           f"({r['centralised_s']['min']:.1f}) | {r['centralised_accuracy']:.4f} |"] if r["centralised_s"] else []), "",
        *([f"Overhead, both as programs: fedllm run / plain loop program = {r['overhead_vs_program_ratio']:.2f}"
           + (f"; flwr run . / plain loop program = {r['flwr_run_vs_program_ratio']:.2f}" if "flwr_run_s" in r else "")
           + "."] if "overhead_vs_program_ratio" in r else []),
        f"Overhead: federated / plain loop (its timed part, in a process that has imported everything) = "
        f"{r['overhead_ratio']:.2f} (rounds only: "
        f"{r['overhead_rounds_only_ratio']:.2f}); quality: federated / centralised = {r['quality_ratio']:.3f}. "
        f"Federated time: {b['process_start_to_round_1_s']:.1f} s start (imports, Ray, model, round-0 eval), "
        f"{b['rounds_s']:.1f} s rounds = {b['client_training_per_worker_s']:.1f} s client training per worker "
        f"({b['all_client_training_s']:.1f} s in all) + {b['server_evaluation_s']:.1f} s server evaluation + "
        f"{b['rest_of_rounds_s']:.1f} s the rest (messages, serialisation, fusion, worker scheduling; round 1 "
        f"alone {b.get('round_1_s', float('nan')):.1f} s, as each Ray worker imports torch and transformers and builds "
        f"the model on its first message).", ""] + own_steps_line(b) + per_round_line(r.get("per_round")))


def own_steps_line(b: dict) -> list[str]:
    if "fedllm_steps_s" not in b:
        return []
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(b["fedllm_steps_s"].items(), key=lambda kv: -kv[1]))
    return [f"fedllm's own server steps: {100 * b['fedllm_share_of_rounds']:.1f}% of the rounds ({steps}).", ""]


def per_round_line(p: dict | None) -> list[str]:
    if not p:
        return []
    reach = ", ".join(f"{goal}% from {p[f'rounds_to_{goal}pct']} rounds" if p[f"rounds_to_{goal}pct"] else f"{goal}% never"
                      for goal in (15, 30))
    return [f"Per round once running: federated {p['federated_round_s']:.2f} s vs plain loop {p['plain_round_s']:.2f} s "
            f"(ratio {p['ratio']:.2f}; round 1 {p.get('round_1_ratio', float('nan')):.2f}); fixed cost per run {p['federated_fixed_s']:.1f} s vs {p['plain_fixed_s']:.1f} s. "
            f"Whole-run overhead within {reach}.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="experiments/fedavg_lora.yaml", help="a single-point experiment YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for that experiment (repeatable), as fedllm run --set")
    parser.add_argument("--no-centralised", dest="centralised", action="store_false",
                        help="skip the pooled-data run (e.g. for RL, where one reward mix would stand for all)")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 20])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/overhead_quality.json"))
    parser.add_argument("--flwr-run", action="store_true",
                        help="also time the README's `flwr run . --stream` (a local SuperLink) with the same settings")
    parser.add_argument("--plain-loop-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop_child:  # one plain loop in this fresh process (plain_loop_program); its values as JSON
        clients = args.clients[0]
        cfg = load_config(REPO / args.experiment, overrides(args.rounds, args.steps, args.overrides, clients))
        print(json.dumps(plain_loop(cfg, clients)))
        return
    result = {"runs": [measure(args.experiment, args.overrides, n, args.rounds, args.steps, args.repeats, args.centralised,
                               args.flwr_run) for n in args.clients]}
    save_and_print(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
