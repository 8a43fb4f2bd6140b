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
