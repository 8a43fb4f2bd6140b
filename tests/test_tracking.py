"""Optional tracking: rounds mirrored to TensorBoard (installed) and MLflow (stubbed: not installed here)."""

import sys
import types

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
    calls = []
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    fake.start_run = lambda run_name: calls.append(("start", run_name))
    fake.log_params = lambda params: calls.append(("params", params))
    fake.log_metrics = lambda metrics, step: calls.append(("metrics", step, metrics))
    fake.end_run = lambda: calls.append(("end",))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr("fedllm.results.tracking.check_installed", lambda kind: None)
    monkeypatch.setattr("fedllm.config.sections.check_installed", lambda kind: None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"output.dir={tmp_path}"]).model_copy()
    cfg.output.tracking = "mlflow"
    writer = ResultsWriter(cfg)
    for rec in ROUNDS:
        writer.log_round(dict(rec))
    writer.finish({}, {})
    assert calls[0] == ("uri", (writer.dir / "mlruns").resolve().as_uri()) and calls[1] == ("start", "fedavg-ideal")
    assert calls[2][1]["strategy.name"] == "fedavg" and calls[2][1]["client.lr"] == "0.0005"
    assert calls[4] == ("metrics", 1, {"accuracy": 0.5, "train_loss": 1.2}) and calls[-1] == ("end",)


def test_missing_tracking_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"output.tracking: 'mlflow' needs the mlflow package: pip install -e '\.\[mlflow\]'"):
        load_config(None, ["output.tracking=mlflow"])
    with pytest.raises(ConfigError, match="output.tracking"):
        load_config(None, ["output.tracking=wandb"])
