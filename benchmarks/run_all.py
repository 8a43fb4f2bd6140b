"""Every benchmark, each in its own process, and one summary table (JSON + Markdown).

    python benchmarks/run_all.py --quick      # < 10 min on 2 cores
    python benchmarks/run_all.py              # the full sizes and 3 repeats everywhere

Sections (see each script's docstring): simulation overhead and quality at budget
(overhead_quality.py; also GRPO on SmolLM2 and R-MTLLMF's full task vectors against the same steps in
a plain loop), client cost and memory (client_cost.py), scaling in the number of
clients (scaling.py) and the server's memory with every client trained (the stack against the
running sum, scaling.py), fusion throughput on 8 x 22.7M task vectors (fusion_throughput.py),
channel throughput (bench_channels.py) and a loopback deployment's round against a simulated one
(deployment_round.py). Results go to results/benchmarks/ (one JSON per
script, summary.json and summary.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

PFIT_SMOLLM2 = ["--experiment", "experiments/pfit/smollm2/pfit.yaml", "--set", "channel={kind: ideal}", "--clients", "4",
                "--no-centralised", "--repeats", "1"]
PFIT_TINY = ["--experiment", "experiments/pfit/pfit_rewards.yaml", "--set", "channel={kind: ideal}", "--clients", "4",
             "--no-centralised", "--repeats", "1"]
RMTLLMF = ["--experiment", "experiments/rmtllmf_jammed.yaml", "--clients", "3", "--rounds", "1", "--no-centralised"]
# server memory with whole-model payloads (MiniLM task vectors, 86.6 MB a reply), every client trained
MINILM_TV = ["--trained", "0", "--rounds", "1", "--set", "model.name=minilm", "--set", "strategy.name=task_arithmetic",
             "--set", "strategy.server_lr=0.05", "--set", "client.max_steps=2", "--set", "strategy.reject_norm_ratio=null"]
RUNNING = ["--set", "strategy.running_sum=true"]
AWGN = ["--set", "channel.kind=awgn"]
MEDIAN = ["--set", "strategy.name=median"]
BF16 = ["--set", "strategy.stack_dtype=bfloat16"]
TINY_ALL = ["--trained", "0", "--rounds", "2"]  # scaling.py's tiny-bert, every client trained


def _sizes(*sizes: int) -> list[str]:
    return ["--sizes", *map(str, sizes)]

PLANS = {
    # section: (script, quick args, full args)
    "overhead_quality": ("overhead_quality", ["--clients", "4", "--rounds", "3", "--steps", "20", "--repeats", "1"],
                         ["--clients", "4", "20", "--rounds", "5", "--steps", "20", "--repeats", "3"]),
    # README's `flwr run .` figure: the Run command (local SuperLink) beside fedllm run and the loop, as programs
    "overhead_flwr_run": ("overhead_quality", ["--clients", "4", "--rounds", "2", "--steps", "5", "--repeats", "1",
                                               "--no-centralised", "--flwr-run"],
                          ["--clients", "4", "--rounds", "5", "--steps", "20", "--repeats", "3", "--no-centralised",
                           "--flwr-run"]),
    # every workload against its floor, the same steps in a plain loop: GRPO (PFIT) and full task vectors (R-MTLLMF)
    "overhead_pfit": ("overhead_quality", [*PFIT_TINY, "--rounds", "2", "--steps", "4"],
                      [*PFIT_SMOLLM2, "--rounds", "3", "--steps", "4"]),
    "overhead_rmtllmf": ("overhead_quality", [*RMTLLMF, "--steps", "20", "--repeats", "1"],
                         [*RMTLLMF, "--steps", "60", "--repeats", "1"]),
    "client_cost": ("client_cost", [], []),
    "scaling": ("scaling", ["--sizes", "4", "16", "64", "128", "--rounds", "3"], ["--sizes", "4", "16", "64", "128"]),
    # README's server-memory rows: the stack against the running sum, over the ideal channel and AWGN
    # (the stacked AWGN round writes what arrives over the stack a segment at a time: N = 64 fits in 24 GB)
    "memory_all_trained": ("scaling", [*_sizes(4, 16), *TINY_ALL], [*_sizes(4, 16, 64), *TINY_ALL]),
    "memory_median_awgn": ("scaling", [*_sizes(4, 16), *TINY_ALL, *MEDIAN, *AWGN], [*_sizes(4, 16, 64), *TINY_ALL, *MEDIAN, *AWGN]),
    "memory_stack": ("scaling", [*_sizes(4, 16), *MINILM_TV], [*_sizes(4, 16, 64), *MINILM_TV]),
    "memory_running": ("scaling", [*_sizes(4, 16), *MINILM_TV, *RUNNING], [*_sizes(4, 16, 64), *MINILM_TV, *RUNNING]),
    "memory_median": ("scaling", [*_sizes(4, 16), *MINILM_TV, *MEDIAN], [*_sizes(4, 16, 64), *MINILM_TV, *MEDIAN]),
    "memory_median_bf16": ("scaling", [*_sizes(4, 16), *MINILM_TV, *MEDIAN, *BF16],
                           [*_sizes(4, 16, 64), *MINILM_TV, *MEDIAN, *BF16]),
    "memory_stack_awgn": ("scaling", [*_sizes(4), *MINILM_TV, *AWGN], [*_sizes(4, 16, 64), *MINILM_TV, *AWGN]),
    "memory_running_awgn": ("scaling", [*_sizes(4, 16), *MINILM_TV, *RUNNING, *AWGN],
                            [*_sizes(4, 16, 64), *MINILM_TV, *RUNNING, *AWGN]),
    "fusion_throughput": ("fusion_throughput", ["--repeats", "2"], ["--repeats", "3"]),
    "bench_channels": ("bench_channels", ["--d", "4000000", "--repeats", "2"], []),
    "deployment_round": ("deployment_round", ["--nodes", "2", "--rounds", "3", "--steps", "5"],
                         ["--nodes", "4", "--rounds", "4", "--steps", "20"]),
}


MEMORY_TITLES = {
    "memory_all_trained": "tiny-bert FedAvg, every client trained, the stack",
    "memory_median_awgn": "tiny-bert, median over AWGN, every client trained",
    "memory_stack": "MiniLM task vectors, every client trained, the stack",
    "memory_running": "MiniLM task vectors, every client trained, the running sum",
    "memory_median": "MiniLM task vectors, median, a float32 stack",
    "memory_median_bf16": "MiniLM task vectors, median, a bfloat16 stack (strategy.stack_dtype)",
    "memory_stack_awgn": "MiniLM task vectors over AWGN, the stack",
    "memory_running_awgn": "MiniLM task vectors over AWGN, the running sum (each reply through the channel alone)",
}


def summary_markdown(results: dict, seconds: dict) -> str:
    sys.path.insert(0, str(HERE))
    lines = ["# fedllm benchmarks", ""]
    from overhead_quality import markdown as oq

    for name, title in (("overhead_quality", "Overhead and quality at budget"),
                        ("overhead_flwr_run", "flwr run . against fedllm run and a plain loop, as programs"),
                        ("overhead_pfit", "PFIT (GRPO) against a plain loop"),
                        ("overhead_rmtllmf", "R-MTLLMF (full task vectors, jammed) against a plain loop")):
        if name in results:
            lines += [f"## {title}", "", oq(results[name])]
    if "client_cost" in results:
        c = results["client_cost"]
        lines += ["## Client cost (MiniLM + LoRA r=8)", "",
                  f"cold model build {c['model_build_cold_s']:.2f} s, cached {c['model_build_cached_s'] * 1e3:.2f} ms; "
                  f"{c['step_s']:.3f} s per training step; payload unpack {c['payload_unpack_s'] * 1e3:.2f} ms; "
                  f"uplink {c['bytes_up_lora'] / 1024:.0f} KB = {100 * c['lora_fraction_of_full']:.2f}% of the full "
                  f"model's {c['bytes_full_model'] / 2**20:.1f} MB; client peak RSS {c['peak_rss_mib']:.0f} MiB.", ""]
    from scaling import markdown as sc

    if "scaling" in results:
        lines += ["## Scaling in the number of clients", "", sc(results["scaling"])]
    for name, title in MEMORY_TITLES.items():
        if name in results:
            lines += [f"## Server memory: {title}", "", sc(results[name])]
    if "fusion_throughput" in results:
        from fusion_throughput import markdown as fu

        lines += ["## Fusion throughput", "", fu(results["fusion_throughput"])]
    if "bench_channels" in results:
        ch = results["bench_channels"]
        lines += ["## Channel throughput", "", f"{ch['clients']} x {ch['d']:,} values, ratio to randn_like + add:", "",
                  "| channel | x floor |", "| --- | --- |"]
        lines += [f"| {r['channel']} {json.dumps(r['params'])} | {r['ratio_to_floor']:.2f} |" for r in ch["rows"]]
        lines.append("")
    if "deployment_round" in results:
        from deployment_round import markdown as dr

        lines += ["## A deployment round against a simulated one (loopback)", "", dr(results["deployment_round"])]
    lines += ["Time per benchmark: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (< 10 min)")
    parser.add_argument("--only", nargs="+", choices=list(PLANS),
                        help="run just these; the summary keeps the others' last results from --out")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, {}
    start = time.perf_counter()
    for name, (script, quick, full) in PLANS.items():
        if args.only and name not in args.only:
            kept = args.out / f"{name}.json"  # re-running one section keeps the others' last results
            if kept.is_file():
                results[name] = json.loads(kept.read_text())
            continue
        out = (args.out / f"{name}.json").resolve()
        cmd = [sys.executable, str(HERE / f"{script}.py"), *(quick if args.quick else full), "--out", str(out)]
        print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
        seconds[name] = time.perf_counter() - t
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-2000:]}", flush=True)
            continue
        results[name] = json.loads(out.read_text())
        print(f"   done in {seconds[name]:.0f} s", flush=True)
    md = summary_markdown(results, seconds) + f"Total: {time.perf_counter() - start:.0f} s\n"
    (args.out / "summary.json").write_text(json.dumps({"quick": args.quick, "results": results, "seconds": seconds},
                                                     indent=2))
    (args.out / "summary.md").write_text(md)
    print(md)
    if any(n not in results for n in PLANS if not args.only or n in args.only):
        sys.exit(1)


if __name__ == "__main__":
    main()
