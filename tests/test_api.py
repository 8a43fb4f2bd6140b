"""The Python API, used only through its public names (what README's "Use from Python" shows)."""

from __future__ import annotations

import pytest

import fedllm
from tests.conftest import TINY_OVERRIDES


@pytest.mark.slow
def test_run_compare_and_load_results_from_python(tmp_path):
    results = tmp_path / "results"
    run = fedllm.run_experiment(None, clients=2, overrides=[*TINY_OVERRIDES, f"output.dir={results}"],
                                echo=lambda line: None)
    table = run.frame()
    assert list(table["round"]) == [0, 1, 2]
    assert table["accuracy"].iloc[-1] == run.summary["final_accuracy"] > table["accuracy"].iloc[0]
    assert (table["clients_used"].iloc[1:] == 2).all()
    assert run.config["model"]["name"] == "tiny-bert" and run.path.parent.parent == results

    loaded = fedllm.load_results(results)
    assert loaded[["round", "accuracy"]].equals(table[["round", "accuracy"]])
    assert set(loaded["run"]) == {str(run.path)}

    # the same experiment from a YAML file: compare finds the finished run by its config hash
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text("{}\n")
    comparison = fedllm.compare([experiment], overrides=[*TINY_OVERRIDES, f"output.dir={results}"], clients=2,
                                out=tmp_path / "report", echo=lambda line: None)
    assert comparison.runs == [run.path] and "fedavg-ideal" in comparison.table
    assert (tmp_path / "report" / "table.md").is_file()


def test_bad_input_raises_the_public_errors(tmp_path):
    with pytest.raises(fedllm.ConfigError, match="client.lrate: unknown key"):
        fedllm.run_experiment(None, overrides=["client.lrate=1"])
    with pytest.raises(fedllm.DataError, match="cannot fill 9 clients"):
        fedllm.run_experiment(None, clients=9, overrides=[*TINY_OVERRIDES, "data.max_train_per_task=10",
                                                          f"output.dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # nothing started, no results folder
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        fedllm.load_results(tmp_path)
