"""What a deployment client pays per message before it trains: Flower 1.42 starts a fresh ClientApp
process for every message, so imports and data partitioning are paid each time.

    python benchmarks/client_start.py [--clients 16]

Each measurement is a fresh interpreter: importing the app (what the identity query needs), importing
a round's work, and one tiny-bert LoRA round of a 16-partition Dirichlet split, first with an empty
partition cache ($FEDLLM_CACHE/partitions, drawn by flwr-datasets) and then with it filled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys, time
t0 = time.perf_counter()
import fedllm.apps.client_app
t1 = time.perf_counter()
from flwr.app import Context, RecordDict
from fedllm.apps.client_round import train_round
from fedllm.apps.payload import round_content
from fedllm.config import load_config
from fedllm.workloads import workload_for
t2 = time.perf_counter()
clients = int(sys.argv[1])
cfg = load_config(None, ["model.name=tiny-bert", "model.max_length=32", "peft.r=4", "data.tasks=[topic]",
                         "data.partition=dirichlet", "data.max_train_per_task=640", "client.max_steps=5"])
bundle = workload_for(cfg).build_model()
content = round_content(dict(bundle.initial_global), cfg.to_json(), 1, clients)
context = Context(run_id=1, node_id=5, node_config={"partition-id": 3, "num-partitions": clients},
                  state=RecordDict(), run_config={})
t3 = time.perf_counter()
train_round(content, context)
t4 = time.perf_counter()
print(json.dumps({"import_app_s": t1 - t0, "import_round_s": t2 - t1, "train_round_s": t4 - t3,
                  "datasets_imported": "datasets" in sys.modules}))
"""


def probe(clients: int, cache: str) -> dict:
    env = {**os.environ, "FEDLLM_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(clients)], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedllm-client-start-") as cache:
        cold, warm = probe(args.clients, cache), probe(args.clients, cache)
    for name, row in (("empty partition cache", cold), ("partition cached", warm)):
        print(f"{name}: import app {row['import_app_s']:.2f} s, import round {row['import_round_s']:.2f} s, "
              f"train_round {row['train_round_s']:.2f} s, datasets imported: {row['datasets_imported']}")


if __name__ == "__main__":
    main()
