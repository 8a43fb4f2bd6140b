"""A simulation on a two-node Ray cluster on 127.0.0.1 (issue 21): the head and a worker node are
separate ``ray start --block`` processes, as on two machines; fedllm joins the cluster with
``--ray-address`` and its clients run on both nodes. Marked ``deployment`` (it starts processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.test_deployment import _free_port, _wait_for, stop_sessions

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.deployment
@pytest.mark.slow
def test_clients_run_on_both_nodes_of_a_ray_cluster_and_nothing_is_left_behind():
    root = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # Ray's socket paths must stay short
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    procs, logs = [], []

    def start(name: str, *args: str) -> None:
        log = root / f"{name}.log"
        logs.append(log)
        procs.append(subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                                       "--num-cpus", "1", "--disable-usage-stats", *args], env=env,
                                      stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("head", "--head", "--port", str(port), "--temp-dir", str(root / "ray"), "--include-dashboard", "false")
        _wait_for(lambda: "Ray runtime started" in logs[0].read_text(), 90, "the Ray head", logs)
        start("worker", "--address", f"127.0.0.1:{port}")
        _wait_for(lambda: "Ray runtime started" in logs[1].read_text(), 90, "the Ray worker node", logs)
        tiny = ["model.name=tiny-bert", "model.max_length=32", "data.tasks=[topic]", "data.max_train_per_task=200",
                "data.max_test_per_task=50", "client.max_steps=3", "rounds=2", f"output.dir={root / 'results'}"]
        run = subprocess.run([str(BIN / "fedllm"), "run", str(REPO / "experiments" / "fedavg_lora.yaml"), "--clients",
                              "4", "--ray-address", f"127.0.0.1:{port}", *[a for o in tiny for a in ("--set", o)]],
                             env=env, capture_output=True, text=True, timeout=600, cwd=root)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        metrics = next((root / "results").glob("*/*/metrics.jsonl"))
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        nodes = {node for r in records[1:] for node in r.get("client_ray_node", {}).values()}
        assert len(nodes) == 2, records  # one CPU per node, four clients: both nodes trained
        assert all(r["clients_used"] == 4 for r in records[1:])
    finally:  # ray start --block stops its node's processes when it is told to stop
        left = stop_sessions(procs, f"{root}|127.0.0.1:{port}", grace=30, settle=30)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"orphan processes:\n{left}"
