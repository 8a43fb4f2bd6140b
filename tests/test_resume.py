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


def _simulate(server_app):
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})


@pytest.mark.slow
def test_resume_after_a_crash_matches_the_uninterrupted_run(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, "rounds=3", "client.max_steps=5", "channel.kind=awgn",
                             "channel.snr_db=10", "strategy.dp_clip_norm=5.0", "strategy.dp_noise_multiplier=0.05",
                             f"output.dir={tmp_path / 'straight'}"])
    _simulate(make_server_app(cfg))
    straight = next((tmp_path / "straight").glob("*/*"))

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
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]
    a = torch.load(straight / "global_params.pt")
    b = torch.load(run_dir / "global_params.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert read_metrics(run_dir)[-1]["accuracy"] == pytest.approx(read_metrics(straight)[-1]["accuracy"])
    # DP noise is part of the checkpointed state too; epsilon keeps counting across the resume
    eps = [r["dp_epsilon"] for r in read_metrics(run_dir)[1:]]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(read_metrics(straight)[-1]["dp_epsilon"])


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
