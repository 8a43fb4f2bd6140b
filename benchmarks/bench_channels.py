"""Channel throughput on MiniLM-sized payloads, as a ratio to the memory-bandwidth floor.

For each channel: floats per second through ``transmit`` for 4 clients x d values (default
d = 22.7M, all-MiniLM-L6-v2's parameter count), and the ratio of its time to a plain
``torch.randn_like(x) + x`` on the same batch, measured in the same run (min of repeats).
Goal: every channel except the worst-case jammer solver within 3x of the floor; the solver
works on antenna-sized matrices, so its time must not grow with d (shown at two sizes).

    python benchmarks/bench_channels.py            # d = 22.7M, 3 repeats
    python benchmarks/bench_channels.py --d 2000000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from fedllm.channels import ClientMeta, build_channel

CASES = [
    ("ideal", {}),
    ("awgn", {"snr_db": 10.0}),
    ("rayleigh", {"snr_db": 10.0, "equalizer": "zf"}),
    ("rayleigh", {"snr_db": 10.0, "equalizer": "mmse", "csi_error_var": 0.05}),
    ("rician", {"snr_db": 10.0, "k_factor": 3.0}),
    ("erasure", {"p": 0.1}),
    ("quantize", {"bits": 8}),
    ("quantize", {"bits": 8, "topk": 0.1}),
    ("ota", {"snr_db": 10.0}),
    ("compose", {"chain": [{"kind": "quantize", "bits": 8}, {"kind": "rayleigh", "snr_db": 10.0}]}),
    ("mimo_mac", {"jammer": "isotropic"}),
    ("mimo_mac", {"jammer": "worst_case"}),
    ("mimo_mac", {"jammer": "strongest_user"}),
]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=22_713_216, help="values per client (default: MiniLM size)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/channels.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.clients, args.d) * 1e-3
    meta = ClientMeta([f"c{i}" for i in range(args.clients)], torch.arange(1.0, args.clients + 1))
    floor = best_time(lambda: torch.randn_like(x) + x, args.repeats)
    rows = []
    for kind, params in CASES:
        channel = build_channel(kind, params, 0)
        seconds = best_time(lambda: channel.transmit(x, meta), args.repeats)
        rows.append({"channel": kind, "params": params, "seconds": seconds,
                     "floats_per_s": x.numel() / seconds, "ratio_to_floor": seconds / floor})
    small = x[:, : max(2, args.d // 100)]
    solver = build_channel("mimo_mac", {"jammer": "worst_case"}, 0)
    solver_small = best_time(lambda: solver.transmit(small, meta), args.repeats)
    print(f"floor (randn_like + add) on {args.clients} x {args.d:,}: {floor:.3f}s "
          f"({x.numel() / floor / 1e6:.0f} M floats/s)")
    print("| channel | params | seconds | M floats/s | x floor |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['channel']} | {json.dumps(r['params'])} | {r['seconds']:.3f} | "
              f"{r['floats_per_s'] / 1e6:.0f} | {r['ratio_to_floor']:.2f} |")
    print(f"mimo_mac worst_case at d/100: {solver_small:.3f}s (the solver's fixed cost; the rest scales with d)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"d": args.d, "clients": args.clients, "floor_seconds": floor, "rows": rows,
                                    "worst_case_small_d_seconds": solver_small}, indent=2))


if __name__ == "__main__":
    main()
