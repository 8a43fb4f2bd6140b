"""What one client round costs with MiniLM + LoRA: load, train, payload, bytes, memory.

Run in a fresh process (peak RSS is the process's own):

    python benchmarks/client_cost.py [--steps 20] [--out results/benchmarks/client_cost.json]

Reports: cold model build (first round in a worker) vs cached (later rounds: the worker keeps
the model), seconds per training step, payload build time, bytes up per round for LoRA r=8 vs
the full model, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flwr.app import Context, RecordDict  # noqa: E402

from fedllm.apps.client_round import train_round  # noqa: E402
from fedllm.apps.payload import round_content  # noqa: E402
from fedllm.config import load_config  # noqa: E402
from fedllm.core.vectors import flatten  # noqa: E402
from fedllm.workloads.classification.data import load_suite  # noqa: E402
from fedllm.workloads.classification.models import build_bundle, cached_bundle  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/client_cost.json"))
    args = parser.parse_args()
    cfg = load_config(REPO / "experiments" / "fedavg_lora.yaml", [f"client.max_steps={args.steps}"])
    suite = load_suite(cfg.data, cfg.seed)
    t = time.perf_counter()
    server = build_bundle(cfg, suite.label_names)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    cached_bundle(cfg, suite.label_names)
    first_cached = time.perf_counter() - t
    t = time.perf_counter()
    cached_bundle(cfg, suite.label_names)
    cached = time.perf_counter() - t
    content = round_content(server.initial_global, cfg.to_json(), 1, 4)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 4},
                      state=RecordDict(), run_config={})
    train_round(content, context)  # warm-up: data partitions, tokenizer
    t = time.perf_counter()
    reply = train_round(round_content(server.initial_global, cfg.to_json(), 2, 4), context)
    round_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(5):
        flatten(reply.array_records["delta"].to_torch_state_dict())
    payload_s = (time.perf_counter() - t) / 5
    lora_values = sum(v.numel() for v in server.initial_global.values())
    full_values = sum(p.numel() for p in server.model.parameters())
    out = {
        "model_build_cold_s": cold, "model_build_cached_s": cached, "first_worker_build_s": first_cached,
        "round_s": round_s, "steps": args.steps, "step_s": round_s / args.steps, "payload_unpack_s": payload_s,
        "bytes_up_lora": lora_values * 4, "bytes_full_model": full_values * 4,
        "lora_fraction_of_full": lora_values / full_values,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    for k, v in out.items():
        print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
