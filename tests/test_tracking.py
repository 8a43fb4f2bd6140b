"""Optional tracking: rounds mirrored to TensorBoard and MLflow, read back with their own readers."""


import pytest

from fedllm.config import ConfigError, load_config
from fedllm.results.writer import ResultsWriter

ROUNDS = [{"round": 0, "accuracy": 0.25, "bytes_up": 0}, {"round": 1, "accuracy": 0.5, "train_loss": 1.2,
                                                           "rejected": [], "skipped": False, "channel_snr_db": "inf"}]


def test_tensorboard_gets_every_numeric_round_value(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, ["output.tracking=tensorboard", f"output.dir={tmp_path}"])
    writer = ResultsWriter(cfg)
    for rec in ROUNDS:
        writer.log_round(dict(rec))
    writer.finish({}, {"final_accuracy": 0.5})
    events = EventAccumulator(str(writer.dir / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["accuracy", "bytes_up", "train_loss"]
    assert [(e.step, e.value) for e in events.Scalars("accuracy")] == [(0, 0.25), (1, 0.5)]


def test_mlflow_gets_params_and_metrics_per_round(tmp_path, monkeypatch):
    """Through the real MLflow client (mlflow-skinny), read back from its store."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, ["output.tracking=mlflow", f"output.dir={tmp_path}"])
    writer = ResultsWriter(cfg)
    for rec in ROUNDS:
        writer.log_round(dict(rec))
    writer.finish({}, {})
    client = MlflowClient(tracking_uri=f"sqlite:///{writer.dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.run_name == "fedavg-ideal" and run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedavg" and run.data.params["client.lr"] == "0.0005"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.25), (1, 0.5)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1.2]


def test_missing_tracking_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"output.tracking: 'mlflow' needs the mlflow package: pip install -e '\.\[mlflow\]'"):
        load_config(None, ["output.tracking=mlflow"])
    with pytest.raises(ConfigError, match="output.tracking"):
        load_config(None, ["output.tracking=wandb"])
