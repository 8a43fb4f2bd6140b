from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedllm.apps.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_run_help_shows_an_example():
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "fedllm run experiments/fedavg_lora.yaml --set rounds=3" in " ".join(result.output.split())


def test_run_rejects_a_bad_key_before_training():
    result = runner.invoke(app, ["run", str(REPO / "experiments" / "fedavg_lora.yaml"), "--set", "client.lrate=1"])
    assert result.exit_code == 2
    assert "client.lrate: unknown key; allowed: trainer, lr" in result.output


def test_run_rejects_a_missing_file(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_every_module_imports_on_its_own():
    """Each module imported first in a fresh interpreter: catches import cycles that test order hides."""
    import subprocess
    import sys

    modules = ["fedllm.config", "clients", "strategies", "channels", "fedllm.apps.cli", "fedllm.apps.client_app",
               "fedllm.apps.client_round"]  # the entry points
    for module in modules:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, f"import {module} failed:\n{result.stderr[-800:]}"


@pytest.mark.parametrize("module", ["fedllm.apps.client_app", "fedllm.apps.server_app"])
def test_the_apps_load_without_torch(module):
    """Flower starts a ClientApp process per message in a deployment: loading the app (all the identity
    query needs) must not import torch or transformers, which the train and evaluate handlers load.
    Under ``flwr run`` Flower loads the ServerApp, then the ClientApp, under one lock and starts Ray
    after both: a heavy ServerApp module would hold Ray back for its imports."""
    import subprocess
    import sys

    probe = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-800:]


def test_round_progress_follows_the_servers_round_lines(capsys):
    from fedllm.apps.cli import RoundProgress

    progress = RoundProgress(rounds=3, enabled=True)
    progress("fedllm: x | model tiny-bert")
    progress("[round 0/3] accuracy=0.2 (before training)")
    assert progress.bar.n == 0
    progress("[round 1/3] train_loss=1.0 accuracy=0.4")
    progress("[round 3/3] skipped: 0 usable replies")
    assert progress.bar.n == 3
    progress("fedllm: done in 1.0s")
    assert "[round 1/3] train_loss=1.0" in capsys.readouterr().out


def _run_fails(tmp_path, *overrides: str, experiment: Path = REPO / "experiments" / "fedavg_lora.yaml") -> str:
    """``fedllm run`` exits 2 with one line naming the problem, before any results folder exists."""
    result = runner.invoke(app, ["run", str(experiment), "--set", f"output.dir={tmp_path / 'results'}",
                                 *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "results").exists()
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    return message


def test_data_errors_are_one_line_and_leave_no_results(tmp_path):
    missing = _run_fails(tmp_path, f"data.tasks=[{{name: mine, source: local, path: {tmp_path / 'none.jsonl'}}}]")
    assert "task 'mine': data path not found" in missing and "none.jsonl" in missing
    data = tmp_path / "d"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "a", "label": 7}\n')
    (data / "test.jsonl").write_text('{"text": "b", "label": 0}\n')
    (data / "labels.json").write_text('["x", "y"]')
    bad_label = _run_fails(tmp_path, f"data.tasks=[{{name: mine, source: local, path: {data}}}]")
    assert "label 7 out of range 0..1" in bad_label and "d (train)" in bad_label
    empty = _run_fails(tmp_path, "data.tasks=[topic]", "data.max_train_per_task=6", "data.num_clients=8")
    assert "cannot fill 8 clients" in empty


def test_unreadable_yaml_is_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("rounds: [1, 2\nstrategy: {name: fedavg")
    message = _run_fails(tmp_path, experiment=broken)
    assert "broken.yaml" in message and "YAML" in message


def test_profile_accounts_for_the_rounds_time(tmp_path):
    """Every round's record splits its time into phases (send, waiting for clients, checks, channel,
    fusion, merge, evaluation) that together cover the round without exceeding it, and --profile prints
    them with their share of the run. With eval.initial false the run starts without scoring round 0."""
    import json

    from fedllm.results.writer import read_metrics

    tiny = ["model.name=tiny-bert", "model.max_length=32", "peft.method=full", "peft.global_patterns=['*']",
            "data.tasks=[topic]", "data.max_train_per_task=200", "data.max_test_per_task=50", "client.max_steps=3",
            "rounds=2", "channel.kind=awgn", "channel.snr_db=10", "eval.initial=false", f"output.dir={tmp_path}"]
    result = runner.invoke(app, ["run", str(REPO / "experiments" / "fedavg_lora.yaml"), "--clients", "2", "--profile",
                                 *[a for o in tiny for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    run_dir = next(tmp_path.glob("*/*/summary.json")).parent
    records = read_metrics(run_dir)
    assert "accuracy" not in records[0] and "accuracy" in records[-1]
    assert "[round 0/2] not evaluated before training" in result.output
    for record in records[1:]:
        phases = record["phase_times"]
        assert set(phases) >= {"send", "wait_for_clients", "checks", "channel", "fusion", "merge", "evaluation"}
        assert all(seconds >= 0 for seconds in phases.values()), phases
        covered = sum(phases.values())
        assert 0.8 * record["round_time"] <= covered <= record["round_time"] + 1e-3, (covered, record["round_time"])
        assert phases["wait_for_clients"] >= record["client_train_time_max"]  # the clients train while it waits
    summary = json.loads((run_dir / "summary.json").read_text())
    for phase in ("wait_for_clients", "channel", "fusion", "evaluation", "checkpoint"):
        assert phase in summary["phase_times"] and phase in result.output
