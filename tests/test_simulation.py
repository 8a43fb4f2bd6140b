"""End to end: Flower's in-process simulation of the real ServerApp and ClientApp."""

import json
import time

import pytest
from flwr.simulation import run_simulation

from fedllm.apps.client_app import app as client_app
from fedllm.apps.server_app import make_server_app
from fedllm.config import load_config
from fedllm.results.writer import read_metrics


@pytest.mark.slow
def test_two_rounds_three_clients_learn_and_write_results(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides)
    start = time.monotonic()
    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    elapsed = time.monotonic() - start
    runs = list((tmp_path / "results").glob("*/*/summary.json"))
    assert len(runs) == 1, "one finished run with a summary"
    run_dir = runs[0].parent
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    untrained, final = records[0]["accuracy"], records[-1]["accuracy"]
    assert final > untrained + 0.15, (untrained, final)
    assert all(r["clients_used"] == 3 for r in records[1:])
    per_client = records[1]["bytes_up_per_client"]
    assert records[1]["bytes_up"] == 3 * per_client and per_client > 0
    summary = json.loads(runs[0].read_text())
    assert summary["final_accuracy"] == final and summary["config_digest"] == cfg.digest()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "global_params.pt").is_file()
    print(f"2 rounds x 3 tiny-bert clients: {elapsed:.1f}s")  # timing targets live in benchmarks, not tests
