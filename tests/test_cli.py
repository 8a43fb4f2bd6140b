from pathlib import Path

from typer.testing import CliRunner

from fedllm.cli import app

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

    modules = ["fedllm.config", "clients", "strategies", "channels", "fedllm.cli", "fedllm.client_app"]  # the entry points
    for module in modules:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, f"import {module} failed:\n{result.stderr[-800:]}"


def test_round_progress_follows_the_servers_round_lines(capsys):
    from fedllm.cli import RoundProgress

    progress = RoundProgress(rounds=3, enabled=True)
    progress("fedllm: x | model tiny-bert")
    progress("[round 0/3] accuracy=0.2 (before training)")
    assert progress.bar.n == 0
    progress("[round 1/3] train_loss=1.0 accuracy=0.4")
    progress("[round 3/3] skipped: 0 usable replies")
    assert progress.bar.n == 3
    progress("fedllm: done in 1.0s")
    assert "[round 1/3] train_loss=1.0" in capsys.readouterr().out
