"""Checkpoint and resume: an interrupted run continued with --resume ends where an uninterrupted one does."""

import pytest
import torch
from flwr.simulation import run_simulation

from fedllm.apps.client_app import app as client_app
from fedllm.apps.server_app import make_server_app
from fedllm.config import ConfigError, load_config
from fedllm.results.writer import load_checkpoint, read_metrics


class Interrupted(RuntimeError):
    pass


def _simulate(server_app, nodes: int = 4):
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in ("time", "wall"))} for r in records]


@pytest.mark.slow
def test_sampled_runs_repeat_exactly_and_a_resumed_run_matches_the_uninterrupted_one(tiny_overrides, tmp_path):
    """Half of 4 clients a round (Poisson-sampled by partition), DP noise, a noisy channel: two runs
    with the same seed agree on every metric (node ids differ between runs), and a run killed after
    round 2 and resumed ends exactly where the uninterrupted one does."""
    cfg = load_config(None, [*tiny_overrides, "rounds=3", "client.max_steps=5", "channel.kind=awgn",
                             "channel.snr_db=10", "strategy.fraction_train=0.5", "strategy.sampling=poisson",
                             "strategy.dp_clip_norm=5.0", "strategy.dp_noise_multiplier=0.05",
                             f"output.dir={tmp_path / 'straight'}"])
    _simulate(make_server_app(cfg))
    again = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(tmp_path / "again")})})
    _simulate(make_server_app(again))
    straight, repeat = next((tmp_path / "straight").glob("*/*")), next((tmp_path / "again").glob("*/*"))
    records = read_metrics(straight)
    assert _without_timing(records) == _without_timing(read_metrics(repeat))
    assert {tuple(r["sampled"]) for r in records[1:]} != {("p0", "p1", "p2", "p3")}  # it did sample

    crashed_cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(tmp_path / "crash")})})

    def crash_after_round_2(line: str) -> None:
        if line.startswith("[round 2/3]"):
            raise Interrupted("power cut")

    try:
        _simulate(make_server_app(crashed_cfg, echo=crash_after_round_2))  # the ServerApp dies after round 2
    except Interrupted:
        pass
    run_dir = next((tmp_path / "crash").glob("*/*"))
    assert not (run_dir / "summary.json").exists()
    assert load_checkpoint(run_dir)["round"] == 2
    _simulate(make_server_app(crashed_cfg, resume=run_dir))
    assert _without_timing(read_metrics(run_dir)) == _without_timing(records)  # epsilon keeps counting too
    a = torch.load(straight / "global_params.pt")
    b = torch.load(run_dir / "global_params.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_a_privacy_budget_stops_the_run_before_it_is_exceeded(tiny_overrides, tmp_path):
    from fedllm.fusion.privacy import PrivacyLedger

    allowed = PrivacyLedger(2.0, 1e-5, 1.0).epsilon(2) * 1.001  # two rounds fit, a third would not
    cfg = load_config(None, [*tiny_overrides, "rounds=4", "client.max_steps=3", "strategy.dp_clip_norm=5.0",
                             "strategy.dp_noise_multiplier=2.0", f"strategy.dp_target_epsilon={allowed}",
                             f"output.dir={tmp_path}"])
    lines = []
    _simulate(make_server_app(cfg, echo=lines.append), nodes=2)
    run_dir = next(tmp_path.glob("*/*"))
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2]
    summary = __import__("json").loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"].startswith("stopped before round 3") and summary["dp_epsilon"] <= allowed
    assert load_checkpoint(run_dir)["round"] == 2 and any("stopped before round 3" in line for line in lines)


def test_resume_refuses_another_config(tiny_overrides, tmp_path):
    from fedllm.apps.federated_run import FederatedRun
    from fedllm.results.writer import ResultsWriter, save_checkpoint

    cfg = load_config(None, tiny_overrides)
    writer = ResultsWriter(cfg)
    save_checkpoint(writer.dir, {"round": 1, "config_digest": "something-else"})
    other = load_config(None, [*tiny_overrides, "rounds=5"])
    with pytest.raises(ConfigError, match="made by another config"):
        FederatedRun(grid=None, cfg=other, resume=writer.dir)
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        FederatedRun(grid=None, cfg=other, resume=tmp_path)


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    """torch.save on a full disk says '[enforce fail at inline_container.cc] unexpected pos'; the writer
    turns that into 'no space left on <folder>' and leaves the previous checkpoint as it was."""
    from fedllm.results.writer import CHECKPOINT, ResultsWriter, StorageError, save_checkpoint

    writer = ResultsWriter(load_config(None, tiny_overrides))
    save_checkpoint(writer.dir, {"round": 1})
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # a partial file is written, then the disk is full
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(StorageError, match=f"no space left on {writer.dir} while writing {CHECKPOINT}"):
        save_checkpoint(writer.dir, {"round": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(writer.dir)["round"] == 1 and not list(writer.dir.glob("*.tmp"))


def test_two_runs_started_in_the_same_second_get_their_own_folders(tiny_overrides):
    from fedllm.results.writer import ResultsWriter

    cfg = load_config(None, tiny_overrides)
    first, second = ResultsWriter(cfg), ResultsWriter(cfg)
    assert first.dir != second.dir and first.dir.parent == second.dir.parent
    first.log_round({"round": 0})
    assert not (second.dir / "metrics.jsonl").exists()
