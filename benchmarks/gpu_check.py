"""What a GPU machine gives fedllm (issue 21): step times and peak GPU memory of
(1) the default classification experiment (MiniLM + LoRA, 2 rounds x 4 clients),
(2) one PFIT round on SmolLM2-135M-Instruct (GRPO, LoRA, bf16),
(3) one QLoRA round: SmolLM2 as a 4-bit NF4 base with LoRA (needs `pip install -e '.[gpu]'`).
On a machine without CUDA it says so and exits 0 (CI runs on CPU).

    python benchmarks/gpu_check.py [--out results/benchmarks/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    "classification (MiniLM, LoRA, default experiment)": (
        "experiments/fedavg_lora.yaml", ["rounds=2", "model.precision=bf16"]),
    "PFIT round on SmolLM2-135M (GRPO, bf16)": (
        "experiments/pfit/smollm2/pfit.yaml", ["rounds=1", "model.precision=bf16"]),
    "QLoRA round on SmolLM2-135M (4-bit NF4 base)": (
        "experiments/pfit/smollm2/pfit.yaml", ["rounds=1", "model.precision=bf16", "model.quantization=4bit"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "gpu_check.json")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; this machine has none (torch.cuda.is_available() is False). "
              "Nothing to measure: exiting.")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedllm.apps.simulation import simulate
    from fedllm.config import load_config

    rows = []
    for name, (experiment, overrides) in CASES.items():
        if not (REPO / experiment).exists():
            rows.append({"case": name, "error": f"{experiment} not found"})
            continue
        cfg = load_config(REPO / experiment, [*overrides, f"output.dir={args.out.parent / 'gpu_check_runs'}"])
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:  # clients run in Ray workers with a GPU share each; the server's evaluation here
            run_dir = simulate(cfg, cfg.data.num_clients or args.clients, gpus_per_client=1.0 / args.clients)
        except Exception as exc:  # one case failing (e.g. no bitsandbytes) must not hide the others
            rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append({"case": name, "wall_s": time.perf_counter() - started,
                     "client_train_time_max_s": [r.get("client_train_time_max") for r in records[1:]],
                     "server_peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
                     "device": torch.cuda.get_device_name(0)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
