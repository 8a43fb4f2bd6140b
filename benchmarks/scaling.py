"""Round time and server memory as the number of registered clients grows, with a fixed number
trained per round (``strategy.fraction_train`` = 8 / N): sampling should make the cost follow
the clients trained, not the clients registered.

    python benchmarks/scaling.py [--sizes 4 16 64 128] [--rounds 4] [--trained 8] [--out results/benchmarks/scaling.json]
    python benchmarks/scaling.py --sizes 4 16 64 --trained 0   # everyone trains: memory grows with N
    python benchmarks/scaling.py --sizes 4 16 64 --trained 0 --set strategy.name=median --set channel.kind=awgn

Each N runs in a fresh process: tiny-bert (full fine-tuning) on the embedded topic task, every
trained client takes exactly 10 steps (``local_epochs`` high, ``max_steps`` 10) whatever its
partition size, evaluation only at the end. Reported per N: median and min round time over the
rounds after the first (the first loads models in the workers), the server's peak RSS, the
payload held per round (trained clients x payload bytes), and wall time of the whole process.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _runs import fedllm_run, save_and_print

TINY = ["model.name=tiny-bert", "model.max_length=32", "peft.method=full", "peft.global_patterns=['*']",
        "data.tasks=[topic]", "data.max_train_per_task=4000", "data.max_test_per_task=200", "client.lr=0.003",
        "client.max_steps=10", "client.local_epochs=50", "client.batch_size=16", "eval.every=1000"]


def measure(sizes: list[int], rounds: int, trained: int = 8, extra: list[str] | None = None) -> dict:
    """``trained`` clients per round (0: all of them, to show memory growing with N x payload);
    ``extra``: overrides of every run (another rule or channel)."""
    rows = []
    for n in sizes:
        k = trained or n
        run = fedllm_run("experiments/fedavg_lora.yaml",
                         [*TINY, f"rounds={rounds}", f"strategy.fraction_train={min(1.0, k / n)}",
                          f"strategy.min_clients={min(k, n)}", *(extra or [])], clients=n)
        times = [r["round_time"] for r in run["records"][2:-1]] or [r["round_time"] for r in run["records"][1:]]
        used = run["records"][-1]["clients_used"]
        rows.append({"clients": n, "trained_per_round": used, "round_time_median": statistics.median(times),
                     "round_time_min": min(times), "first_round_time": run["records"][1]["round_time"],
                     "server_peak_rss_mb": run["summary"]["server_peak_rss_mb"],
                     # sampled to the process's exit, by kind: its own heap, and Ray's object-store pages
                     "server_peak_heap_mb": run["memory"].get("heap_peak_mb"),
                     "server_peak_shared_mb": run["memory"].get("shared_peak_mb"),
                     "payload_mb_per_round": run["summary"]["bytes_up_per_client_per_round"] * used / 2**20,
                     "process_wall_s": run["wall"], "final_accuracy": run["summary"]["final_accuracy"]})
    base = rows[0]["round_time_median"]
    for r in rows:
        r["round_time_ratio"] = r["round_time_median"] / base
    return {"rounds": rounds, "trained": trained, "overrides": extra or [], "rows": rows}


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(result: dict) -> str:
    lines = ["Round time vs registered clients (tiny-bert, 10 steps per trained client):", "",
             "| clients | trained | round time median (min) s | x N=first | first round s | server peak RSS MB "
             "| of it: heap / Ray shared MB (peaks, sampled) | payload MB/round | process wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['clients']} | {r['trained_per_round']} | {r['round_time_median']:.2f} ({r['round_time_min']:.2f}) "
              f"| {r['round_time_ratio']:.2f} | {r['first_round_time']:.1f} | {r['server_peak_rss_mb']:.0f} "
              f"| {_mb(r.get('server_peak_heap_mb'))} / {_mb(r.get('server_peak_shared_mb'))} "
              f"| {r['payload_mb_per_round']:.1f} | {r['process_wall_s']:.1f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64, 128])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--trained", type=int, default=8, help="clients trained per round; 0: all")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. strategy.name=median")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/scaling.json"))
    args = parser.parse_args()
    result = measure(args.sizes, args.rounds, args.trained, args.overrides)
    save_and_print(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
