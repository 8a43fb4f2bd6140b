"""Loopback deployment: a SuperLink and two SuperNodes as real processes, TLS on, a 2-round run.

Marked ``deployment`` so it can be deselected (``pytest -m "not deployment"``); CI runs it.
Every process is started in its own session and its whole group is killed at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedllm.results.writer import read_metrics

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    tails = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


@pytest.mark.deployment
@pytest.mark.slow
def test_superlink_and_two_supernodes_over_tls(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "deploy" / "make_certs.sh"), str(certs)], check=True, capture_output=True)
    home = tmp_path / "flwr"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "edge"\n\n[superlink.edge]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    experiment = tmp_path / "tiny.yaml"
    results = tmp_path / "results"
    experiment.write_text("# loopback\n" + yaml.safe_dump({
        "model": {"name": "tiny-bert", "max_length": 32}, "peft": {"method": "full", "global_patterns": ["*"]},
        "data": {"tasks": ["topic"], "max_train_per_task": 300, "max_test_per_task": 100},
        "client": {"lr": 0.003, "max_steps": 5}, "rounds": 2, "output": {"dir": str(results)}}))
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, cmd: list[str]) -> None:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=tmp_path))

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                            "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                            "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "state.db")])
        _wait_for(lambda: "Uvicorn running on https" in logs[0].read_text(), 60, "the SuperLink", logs)
        for i in range(2):
            start(f"supernode{i}", [str(BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.crt"),
                                    "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
                                    "--node-config", f"partition-id={i} num-partitions=2"])
        _wait_for(lambda: logs[0].read_text().count("Activated node_id") >= 2, 60, "two SuperNodes", logs)
        run = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "edge", "--stream",
                              "--run-config", f"experiment='{experiment}'"],
                             env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        (tmp_path / "flwr-run.log").write_text(run.stdout + run.stderr)
        logs.append(tmp_path / "flwr-run.log")
        _wait_for(lambda: any(results.glob("*/*/summary.json")), 60, "the run's summary.json", logs)
        records = read_metrics(next(results.glob("*/*/summary.json")).parent)
        assert [r["round"] for r in records] == [0, 1, 2]
        assert all(r["clients_used"] == 2 for r in records[1:])
        assert "[round 2/2]" in run.stdout
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    def leftovers() -> str:  # processes still naming this test's folder (children watch their parent's pid)
        return subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True).stdout.strip()

    deadline = time.monotonic() + 15
    while leftovers() and time.monotonic() < deadline:
        time.sleep(1)
    assert not leftovers(), f"orphan processes:\n{leftovers()}"
