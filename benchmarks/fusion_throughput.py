"""Fusion rules on stacked task vectors of MiniLM's size, timed against a plain torch sum.

    python benchmarks/fusion_throughput.py [--clients 8] [--dim 22713216] [--repeats 3]
        [--out results/benchmarks/fusion_throughput.json]

Each rule runs ``--repeats`` times on the same (clients x dim) float32 tensor (seeded normal
entries); reported: min and median seconds, the ratio of the median to the median of
``deltas.sum(0)`` measured in the same run (machines are noisy, ratios less so), and the input
throughput in GB/s. 22,713,216 is the parameter count of all-MiniLM-L6-v2 (full fine-tuning).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _runs import save_and_print
from fedllm.strategies import build_rule

RULES = ["fedavg", "task_arithmetic", "ties", "dare", "median", "trimmed_mean", "norm_clip"]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure(clients: int, dim: int, repeats: int, rules: list[str] | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(clients, dim, generator=g)
    weights = torch.ones(clients)
    base = timed(lambda: deltas.sum(0), repeats)
    gb = deltas.numel() * 4 / 1e9
    rows = [{"rule": "torch sum (floor)", "min_s": min(base), "median_s": statistics.median(base), "ratio": 1.0,
             "gb_per_s": gb / statistics.median(base)}]
    for name in rules or RULES:
        rule = build_rule(name, {}, seed=0)
        t = timed(lambda: rule(deltas, weights), repeats)
        rows.append({"rule": name, "min_s": min(t), "median_s": statistics.median(t),
                     "ratio": statistics.median(t) / statistics.median(base), "gb_per_s": gb / statistics.median(t)})
    return {"clients": clients, "dim": dim, "repeats": repeats, "threads": torch.get_num_threads(), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Fusion of {result['clients']} x {result['dim']:,} float32 ({result['threads']} threads), "
             f"median of {result['repeats']}:", "", "| rule | min (s) | median (s) | x torch sum | GB/s |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['rule']} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['ratio']:.1f} | {r['gb_per_s']:.2f} |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--dim", type=int, default=22_713_216)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/fusion_throughput.json"))
    args = parser.parse_args()
    result = measure(args.clients, args.dim, args.repeats)
    save_and_print(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
