"""A client that imports other fedllm code than the server (a stale copy first on its path) refuses
to train, saying where each side's code comes from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedllm.apps.client_round import check_same_code
from fedllm.apps.fingerprint import code_fingerprint
from fedllm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_different_fingerprint_is_refused():
    check_same_code({"code": code_fingerprint()})
    check_same_code({})  # a server too old to send one: nothing to compare
    with pytest.raises(ConfigError, match=r"this client runs fedllm from .* not the server's \(code 0000"):
        check_same_code({"code": "0000", "code-location": "/elsewhere/fedllm"})


@pytest.mark.slow
def test_clients_running_a_stale_copy_are_rejected_not_trained(tiny_overrides, tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.server_app import make_server_app
    from fedllm.results.writer import read_metrics

    stale = tmp_path / "stale"
    for folder in ("fedllm", "channels", "strategies", "clients"):
        shutil.copytree(ROOT / folder, stale / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with (stale / "channels" / "awgn.py").open("a") as fh:
        fh.write("\n# an edit the server does not have\n")
    monkeypatch.chdir(stale)  # Ray's workers (the clients) start here and import the stale copy first
    cfg = load_config(None, [*tiny_overrides, "rounds=1", "client.max_steps=2", "strategy.round_timeout=120",
                             f"output.dir={tmp_path / 'results'}"])
    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    record = read_metrics(next((tmp_path / "results").glob("*/*")))[1]
    assert record["skipped"] and record["clients_used"] == 0 and record["clients_rejected"] == 2
    assert all(f"runs fedllm from {stale / 'fedllm'}" in why and "Traceback" not in why for why in record["rejected"])
