"""The warm worker of a deployed node (fedllm/apps/warm_worker.py): a round done there is the round the
ClientApp process would do itself, state included; errors come back as the client's failure; the worker
leaves with its node; a worker that dies mid-message leaves the work to the ClientApp."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedllm.apps import warm_worker
from fedllm.apps.client_round import ROUNDS_STATE, train_round
from fedllm.apps.payload import CONFIG, DELTA, METRICS, round_content
from fedllm.config import load_config
from tests.test_client_app import LORA_TINY, _global

PROGRAM = "/venv/bin/flwr-clientapp"  # what sys.argv[0] is in Flower's ClientApp process


def _context(idle: float = 30.0) -> Context:
    return Context(run_id=1, node_id=11, node_config={"partition-id": 1, "num-partitions": 3,
                                                      "warm-worker-idle": idle}, state=RecordDict(), run_config={})


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Sockets under this test's folder; every worker started here is stopped at the end."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path
    for pid_file in tmp_path.rglob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_a_round_in_the_warm_worker_is_the_round_the_clientapp_would_do(private_tmp):
    cfg = load_config(None, [*LORA_TINY, "peft.global_patterns=['query.lora_', classifier]",
                             "peft.local_patterns=['value.lora_']"])
    content = round_content(_global(cfg).initial_global, cfg.to_json(), 1, 0)
    warm, here = _context(), _context()
    node_state = warm.state  # the object Flower holds: updated in place, not replaced
    for rnd in (1, 2):  # the second round starts from the state the first left (local LoRA, rounds seen)
        got = warm_worker.run_in_worker("train", content, warm, program=PROGRAM)
        expected = train_round(content, here)
        assert got is not None
        sent, own = got.array_records[DELTA].to_torch_state_dict(), expected.array_records[DELTA].to_torch_state_dict()
        assert list(sent) == list(own)
        assert all(torch.allclose(sent[n], own[n], atol=1e-5) for n in own)
        assert any(torch.count_nonzero(t) for t in sent.values())
        metrics, own_metrics = dict(got.metric_records[METRICS]), dict(expected.metric_records[METRICS])
        assert metrics["local_rounds"] == own_metrics["local_rounds"] == rnd
        assert metrics["train_loss"] == pytest.approx(own_metrics["train_loss"], rel=1e-4)
        assert set(warm.state.keys()) == set(here.state.keys())
        assert warm.state is node_state and node_state.config_records[ROUNDS_STATE]["n"] == rnd
    # one worker served both rounds: the same process, still listening
    pid_files = list(private_tmp.rglob("*.pid"))
    assert len(pid_files) == 1 and warm_worker._alive(int(pid_files[0].read_text()))


def test_a_failing_round_fails_the_message_and_the_worker_serves_the_next(private_tmp):
    cfg = load_config(None, LORA_TINY)
    good = round_content(_global(cfg).initial_global, cfg.to_json(), 1, 0)
    bad = round_content(_global(cfg).initial_global, cfg.to_json(), 1, 0)
    bad.config_records[CONFIG] = ConfigRecord({**dict(bad.config_records[CONFIG]), "code": "0123456789abcdef"})
    with pytest.raises(RuntimeError, match="not the server's"):
        warm_worker.run_in_worker("train", bad, _context(), program=PROGRAM)
    assert warm_worker.run_in_worker("train", good, _context(), program=PROGRAM) is not None


def test_the_worker_leaves_with_its_node(tmp_path):
    node = subprocess.Popen(["sleep", "60"])  # stands for the SuperExec that starts the node's ClientApps
    path = tmp_path / "w.sock"
    sock = warm_worker.ensure_worker(path, idle=60, parent=node.pid)
    assert sock is not None
    sock.close()
    worker = int(path.with_suffix(".pid").read_text())
    node.kill()
    node.wait()
    deadline = time.monotonic() + 30
    while warm_worker._alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not warm_worker._alive(worker)
    assert not path.exists()  # it removed its socket


def test_a_worker_that_dies_mid_message_leaves_the_work_to_the_clientapp():
    ours, theirs = socket.socketpair()
    theirs.close()  # the worker is gone before it replies
    assert warm_worker.call(ours, "train", RecordDict(), _context()) is None


def test_only_flowers_clientapp_process_uses_a_worker_and_a_node_can_say_no():
    assert warm_worker.wanted(_context(), PROGRAM)
    assert not warm_worker.wanted(_context(), "/usr/bin/python")  # a simulation's Ray worker, a test
    refusing = _context()
    refusing.node_config["warm-worker"] = "false"
    assert not warm_worker.wanted(refusing, PROGRAM)
    assert warm_worker.run_in_worker("train", RecordDict(), refusing, program=PROGRAM) is None
