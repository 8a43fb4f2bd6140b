"""Fusion rules on stacked task vectors of MiniLM's size, timed against a plain torch sum.

    python benchmarks/fusion_throughput.py [--clients 8] [--dim 22713216] [--repeats 3]
        [--out results/benchmarks/fusion_throughput.json]

Each rule runs ``--repeats`` times on the same (clients x dim) float32 tensor (seeded normal
entries); reported: min and median seconds, the ratio of the median to the median of
``deltas.sum(0)`` measured in the same run (machines are noisy, ratios less so), the input
throughput in GB/s, and the memory a call adds at its peak beyond the stack (its result included;
Linux only: the peak is reset through /proc/self/clear_refs before each rule). 22,713,216 is the
parameter count of all-MiniLM-L6-v2 (full fine-tuning), 134,515,008 SmolLM2-135M's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _runs import save_and_print
from fedllm.core.memory import reset_peak, resident_mb
from fedllm.strategies import build_rule

RULES = ["fedavg", "task_arithmetic", "ties", "dare", "median", "trimmed_mean", "norm_clip"]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def peak_extra_mb(fn) -> float | None:
    """Resident MB that one more call of ``fn`` adds at its peak, after the timed ones (one call: over
    the repeats the heap's retained free memory would count too); None where the peak cannot be reset."""
    before = resident_mb() if reset_peak() else None
    fn()
    return None if before is None else resident_mb("VmHWM") - before


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
                     "ratio": statistics.median(t) / statistics.median(base), "gb_per_s": gb / statistics.median(t),
                     "peak_extra_mb": peak_extra_mb(lambda: rule(deltas, weights))})
    return {"clients": clients, "dim": dim, "repeats": repeats, "threads": torch.get_num_threads(), "rows": rows}


def markdown(result: dict) -> str:
    stack_mb = result["clients"] * result["dim"] * 4 / 2**20
    lines = [f"Fusion of {result['clients']} x {result['dim']:,} float32 ({stack_mb:,.0f} MB; {result['threads']} "
             f"threads), median of {result['repeats']}; peak: memory added beyond the stack:", "",
             "| rule | min (s) | median (s) | x torch sum | GB/s | peak (MB) |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['rule']} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['ratio']:.1f} | {r['gb_per_s']:.2f} | "
              f"{'' if r.get('peak_extra_mb') is None else format(r['peak_extra_mb'], ',.0f')} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--dim", type=int, default=22_713_216)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rules", nargs="+", choices=RULES, help="only these rules (default: all)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/fusion_throughput.json"))
    args = parser.parse_args()
    result = measure(args.clients, args.dim, args.repeats, args.rules)
    save_and_print(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
