"""fedllm compare / report: sweep expansion, result cache, tables and plots."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedllm.apps.cli import app
from fedllm.config import ConfigError
from fedllm.results.sweep import expand_sweep, plan

runner = CliRunner()


def _tiny_yaml(path: Path, results: Path, **extra) -> Path:
    cfg = {"model": {"name": "tiny-bert", "max_length": 32},
           "peft": {"method": "full", "global_patterns": ["*"]},
           "data": {"tasks": ["topic"], "max_train_per_task": 300, "max_test_per_task": 100, "num_clients": 2},
           "client": {"lr": 0.003, "max_steps": 10}, "rounds": 1, "output": {"dir": str(results)}}
    cfg.update(extra)
    path.write_text("# tiny\n" + yaml.safe_dump(cfg))
    return path


def test_sweep_expands_to_the_cartesian_product(tmp_path):
    points = expand_sweep({"strategy.name": ["fedavg", "median"], "channel.snr_db": [0, 10, 20], "seed": [0, 1]})
    assert len(points) == 12
    assert points[0] == {"strategy.name": "fedavg", "channel.snr_db": 0, "seed": 0}
    assert {p["strategy.name"] for p in points} == {"fedavg", "median"}
    path = _tiny_yaml(tmp_path / "s.yaml", tmp_path / "r",
                      sweep={"channel": [{"kind": "ideal"}, {"kind": "awgn", "snr_db": 5}], "seed": [0, 1]})
    runs = plan([path])
    assert len(runs) == 4 and len({r.config.digest() for r in runs}) == 4
    assert [r.config.channel.kind for r in runs] == ["ideal", "ideal", "awgn", "awgn"]
    with pytest.raises(ConfigError, match="sweep.seed: must be a non-empty list"):
        expand_sweep({"seed": 3})
    # --set on a swept key pins it: one run per remaining point, labelled by what still varies, not
    # two runs of one config labelled with sweep values the override replaced
    pinned = plan([path], ["seed=7"])
    assert [r.config.seed for r in pinned] == [7, 7] and [r.overrides for r in pinned] == [
        {"channel": {"kind": "ideal"}}, {"channel": {"kind": "awgn", "snr_db": 5}}]
    assert [r.config.channel.kind for r in plan([path], ["channel.kind=ideal", "seed=1"])] == ["ideal"]
    bad = _tiny_yaml(tmp_path / "bad.yaml", tmp_path / "r", sweep={"client.lrr": [1]})
    with pytest.raises(ConfigError, match=r"(?s)bad.yaml: .*client.lrr: unknown key"):
        plan([bad])


@pytest.mark.slow
def test_compare_runs_once_caches_and_report_reproduces_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    a = _tiny_yaml(tmp_path / "a.yaml", results, output={"dir": str(results), "name": "a"})
    b = _tiny_yaml(tmp_path / "b.yaml", results, output={"dir": str(results), "name": "b"},
                   channel={"kind": "awgn", "snr_db": -30, "power_normalisation": "payload"})
    first = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert first.exit_code == 0, first.output
    assert first.output.count(": running") == 2
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "| a | — | 1 |" in table and "| b | — | 1 |" in table  # named runs need no setting column
    second = runner.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp2")])
    assert second.exit_code == 0 and second.output.count(": cached") == 2 and ": running" not in second.output
    assert (tmp_path / "cmp2" / "table.md").read_text() == table
    again = runner.invoke(app, ["report", str(results), "--out", str(tmp_path / "rep")])
    assert again.exit_code == 0
    assert (tmp_path / "rep" / "table.md").read_text() == table
    assert (tmp_path / "rep" / "table.csv").read_text().startswith("run,setting,seeds,final_accuracy")
    plots = json.loads((tmp_path / "rep" / "plots.json").read_text())
    assert set(plots) >= {"accuracy_vs_round.png", "accuracy_vs_uplink.png", "accuracy_per_task.png"}
    main = ("accuracy_vs_round.png", "accuracy_vs_uplink.png", "accuracy_per_task.png")
    assert all(len(plots[name]) == 2 for name in main)
    for name in plots:
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_an_empty_folder_fails_clearly(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no finished runs" in result.output


def test_uplink_to_reach_a_target_uses_the_personalised_score_when_clients_evaluate(tmp_path):
    from fedllm.results.report import RunResult, markdown_table, summarise, uplink_to_reach

    cfg = {"strategy": {"name": "personalized"}, "channel": {"kind": "ideal"}, "output": {"name": "p"}}
    recs = [{"round": 0, "accuracy": 0.2, "bytes_up": 0},
            {"round": 1, "accuracy": 0.3, "personalized_accuracy": 0.6, "bytes_up": 100},
            {"round": 2, "accuracy": 0.4, "personalized_accuracy": 0.85, "bytes_up": 100},
            {"round": 3, "accuracy": 0.5, "personalized_accuracy": 0.9, "bytes_up": 100}]
    run = RunResult(tmp_path, cfg, recs, {"final_accuracy": 0.5, "total_bytes_up": 300, "wall_time": 1.0})
    assert uplink_to_reach(run, 0.8, "personalized_accuracy") == 200
    assert uplink_to_reach(run, 0.8, "accuracy") is None
    rows = summarise([run], target=0.8)
    assert rows[0]["target_key"] == "personalized_accuracy" and rows[0]["bytes_to_target"] == 200
    assert "uplink MB to 0.8 |" in markdown_table(rows, target=0.8)
    assert summarise([run], target=0.95)[0]["bytes_to_target"] != summarise([run], target=0.95)[0]["bytes_to_target"]


def test_a_run_whose_config_no_longer_validates_is_reported_with_a_warning(tmp_path):
    import json

    from fedllm.results.report import load_run

    (tmp_path / "config.yaml").write_text("strategy: {name: fedavg}\nchannel: {kind: ideal}\nclient: {lrate: 1}\n")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 0, "accuracy": 0.5}) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"final_accuracy": 0.5}))
    with pytest.warns(UserWarning, match="client.lrate: unknown key"):
        run = load_run(tmp_path)
    assert run.config["client"] == {"lrate": 1} and run.label == "fedavg-ideal"
