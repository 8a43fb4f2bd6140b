"""What one client round costs: load, train, payload, bytes, memory (default: MiniLM + LoRA).

Run in a fresh process (peak RSS is the process's own):

    python benchmarks/client_cost.py [--experiment experiments/fedavg_lora.yaml] [--set KEY=VALUE]
        [--steps 20] [--out results/benchmarks/client_cost.json]

e.g. GRPO on SmolLM2: ``--experiment experiments/pfit/smollm2/pfit.yaml --set 'channel={kind: ideal}'
--steps 4``; PFTT on SmolLM2: ``--experiment experiments/pftt/smollm2/pftt.yaml --set data.alpha=0.1``.
Reports: cold model build (first round in a worker) vs cached (later rounds: the worker keeps
the model), the client's first round (data partition, tokenizer and first-step costs included)
and a second one, seconds per training step, payload unpack time, bytes up per round vs the
full model, and the process's peak resident memory.
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
from fedllm.workloads import workload_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="experiments/fedavg_lora.yaml", help="a single-point experiment YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for that experiment (repeatable), as fedllm run --set")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/client_cost.json"))
    args = parser.parse_args()
    cfg = load_config(REPO / args.experiment, [*args.overrides, f"client.max_steps={args.steps}"])
    workload = workload_for(cfg)
    t = time.perf_counter()
    server = workload.build_model()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    workload.cached_model()
    first_cached = time.perf_counter() - t
    t = time.perf_counter()
    workload.cached_model()
    cached = time.perf_counter() - t
    clients = cfg.data.num_clients or 4
    content = round_content(server.initial_global, cfg.to_json(), 1, clients)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": clients},
                      state=RecordDict(), run_config={})
    t = time.perf_counter()
    train_round(content, context)  # the first: data partition, tokenizer, first-step costs
    first_round_s = time.perf_counter() - t
    t = time.perf_counter()
    reply = train_round(round_content(server.initial_global, cfg.to_json(), 2, clients), context)
    round_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(5):
        flatten(reply.array_records["delta"].to_torch_state_dict())
    payload_s = (time.perf_counter() - t) / 5
    lora_values = sum(v.numel() for v in server.initial_global.values())
    full_values = sum(p.numel() for p in server.model.parameters())
    out = {
        "model_build_cold_s": cold, "model_build_cached_s": cached, "first_worker_build_s": first_cached,
        "experiment": args.experiment, "overrides": args.overrides, "first_round_s": first_round_s,
        "round_s": round_s, "steps": args.steps, "step_s": round_s / args.steps, "payload_unpack_s": payload_s,
        "bytes_up_lora": lora_values * 4, "bytes_full_model": full_values * 4,
        "lora_fraction_of_full": lora_values / full_values,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    for k, v in out.items():
        print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
