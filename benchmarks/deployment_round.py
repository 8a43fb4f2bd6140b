"""A deployment round against the same round in simulation: what a SuperNode pays beyond its training.

    python benchmarks/deployment_round.py [--nodes 4] [--rounds 4] [--model tiny-bert] [--steps 20]

The same experiment runs twice on this machine: under ``fedllm run --clients N`` (Flower's simulation:
Ray workers that keep their imports and models across rounds) and on a loopback deployment (a TLS
SuperLink and N SuperNodes as real processes, the one ``tests/test_deployment.py`` starts; Flower 1.42
starts a fresh ClientApp process for every message), with the nodes' warm workers
(fedllm/apps/warm_worker.py) and without them (``warm-worker=false``). Each round's record splits its time into waiting
for the clients, evaluation and the server's own phases, and keeps the slowest client's training
time, so the table shows where a deployment round's extra time goes. Round 1 is listed apart (it
carries every worker's first imports in simulation).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from _runs import REPO, fedllm_run, save_and_print

sys.path.insert(0, str(REPO))  # the loopback deployment of tests/test_deployment.py
LATER = "later rounds (median)"


def experiment(model: str, steps: int, rounds: int, nodes: int) -> dict:
    """Each client has data for ``steps`` batches of 16 (100 examples are held out for validation)."""
    return {"model": {"name": model, "max_length": 32}, "peft": {"method": "lora", "r": 4},
            "data": {"tasks": ["topic"], "max_train_per_task": 100 + 16 * steps * nodes, "max_test_per_task": 100},
            "client": {"lr": 0.003, "max_steps": steps}, "rounds": rounds, "strategy": {"min_clients": nodes}}


def split(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per-round seconds (round 1 and the median of the later rounds): the round, waiting for the
    clients, the slowest client's training, the wait beyond it, evaluation."""
    def row(r: dict) -> dict[str, float]:
        wait = r["phase_times"]["wait_for_clients"]
        return {"round": r["round_time"], "wait_for_clients": wait, "slowest_training": r["client_train_time_max"],
                "wait_beyond_training": wait - r["client_train_time_max"], "evaluation": r["phase_times"]["evaluation"]}

    rounds = [row(r) for r in records if r.get("round", 0) >= 1]
    later = rounds[1:] or rounds
    return {"round 1": rounds[0], LATER: {k: statistics.median(r[k] for r in later) for k in later[0]}}


def deployed(exp: dict, nodes: int, tmp: Path, warm: bool = True) -> list[dict]:
    """``warm=False``: each ClientApp process trains itself (``warm-worker=false``), as before the warm worker."""
    from tests.test_deployment import Loopback

    tmp.mkdir(parents=True)
    deployment = Loopback(tmp, database=":flwr-in-memory:")
    # one torch thread per node, as Ray gives each simulated client: N nodes x 2 threads on 2 shared cores
    # spin against each other (a real device has its cores to itself)
    deployment.env["OMP_NUM_THREADS"] = "1"
    try:
        for i in range(nodes):
            deployment.supernode(f"supernode{i}", f"partition-id={i} num-partitions={nodes}"
                                 + ("" if warm else " warm-worker=false"))
        deployment.wait_for_nodes(nodes, timeout=240)
        records, _ = deployment.run(exp)
    finally:
        deployment.close()
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", default="tiny-bert", help="tiny-bert, minilm, smollm2-135m or a folder")
    parser.add_argument("--steps", type=int, default=20, help="local steps per round")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "deployment_round.json")
    args = parser.parse_args(argv)
    exp = experiment(args.model, args.steps, args.rounds, args.nodes)
    tmp = Path(tempfile.mkdtemp(prefix="fedllm-deploy-bench-"))
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp))
    simulated = fedllm_run(str(path), [], args.nodes, tmp / "simulation")
    result = {"nodes": args.nodes, "rounds": args.rounds, "model": args.model, "steps": args.steps,
              "simulation": split(simulated["records"]),
              "deployment": split(deployed(exp, args.nodes, tmp / "deployment")),
              "deployment, no warm worker": split(deployed(exp, args.nodes, tmp / "cold", warm=False))}
    result["ratio"] = result["deployment"][LATER]["round"] / result["simulation"][LATER]["round"]
    save_and_print(result, args.out, markdown(result))


def markdown(result: dict) -> str:
    lines = [f"{result['nodes']} clients, {result['model']} LoRA r=4, {result['steps']} steps a round, "
             f"{result['rounds']} rounds; seconds", "",
             "| rounds | run | round | waiting for clients | slowest client's training | wait beyond it | evaluation |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for part in ("round 1", LATER):
        for run in ("simulation", "deployment", "deployment, no warm worker"):
            r = result[run][part]
            lines.append(f"| {part} | {run} | {r['round']:.2f} | {r['wait_for_clients']:.2f} | {r['slowest_training']:.2f} "
                         f"| {r['wait_beyond_training']:.2f} | {r['evaluation']:.2f} |")
    lines += ["", f"deployment / simulation, later rounds: {result['ratio']:.2f}x (goal <= 1.3x)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
