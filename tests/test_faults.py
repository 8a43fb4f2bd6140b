"""Faulty clients in a real simulation: bad replies are rejected with reasons, the run goes on."""

import time

import pytest
import torch
from flwr.simulation import run_simulation

from fedllm.apps.client_app import app as client_app
from fedllm.apps.payload import reject_outlier_norms
from fedllm.apps.server_app import make_server_app
from fedllm.config import ConfigError, load_config
from fedllm.core.faults import ClientCrash, FaultSpec, apply_fault
from fedllm.core.types import ClientUpdate
from fedllm.results.writer import read_metrics

FAULTS = ("client.faults=[{kind: nan, clients: [2]}, {kind: crash, clients: [3]}, "
          "{kind: wrong_names, clients: [4]}, {kind: huge_norm, clients: [5]}]")


def _simulate(cfg, clients):
    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})


def test_byzantine_faults_transform_the_delta():
    delta = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[3.0]])}
    flipped = apply_fault(FaultSpec(kind="sign_flip", clients=[0], scale=2.0), delta, {}, seed=0)
    assert torch.equal(flipped["a"], torch.tensor([-2.0, 4.0]))
    rnd = apply_fault(FaultSpec(kind="random", clients=[0]), delta, {}, seed=0)
    norm = lambda d: float(torch.sqrt(sum(t.pow(2).sum() for t in d.values())))  # noqa: E731
    assert norm(rnd) == pytest.approx(norm(delta), rel=1e-5)
    metrics = {"num-examples": 5}
    apply_fault(FaultSpec(kind="no_examples", clients=[0]), delta, metrics, seed=0)
    assert metrics["num-examples"] == 0
    with pytest.raises(ClientCrash):
        apply_fault(FaultSpec(kind="crash", clients=[0]), delta, {}, seed=0)


def test_fault_fraction_is_seeded_and_config_is_validated():
    spec = FaultSpec(kind="sign_flip", fraction=0.2)
    hit = [p for p in range(10) if spec.hits(p, 10, seed=0)]
    assert len(hit) == 2 and hit == [p for p in range(10) if spec.hits(p, 10, seed=0)]
    with pytest.raises(ConfigError, match="give 'clients'"):
        load_config(None, "client.faults=[{kind: nan}]")
    with pytest.raises(ConfigError, match="client.faults.0.kind"):
        load_config(None, "client.faults=[{kind: melt, clients: [1]}]")
    with pytest.raises(ConfigError, match="give 'delay'"):
        load_config(None, "client.faults=[{kind: slow, clients: [1]}]")


def test_outlier_norms_are_rejected_against_the_median():
    ups = [ClientUpdate(i, torch.full((4,), v), 1, {}) for i, v in enumerate([1.0, 1.2, 0.9, 500.0])]
    kept, reasons = reject_outlier_norms(ups, 100.0)
    assert [u.node_id for u in kept] == [0, 1, 2]
    assert len(reasons) == 1 and "client 3: delta norm" in reasons[0]
    assert reject_outlier_norms(ups[:1] + ups[3:], 100.0)[0] == ups[:1] + ups[3:]  # fewer than 3: no median test


@pytest.mark.slow
def test_bad_clients_are_left_out_and_the_round_completes(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, FAULTS, "strategy.min_clients=2", "client.local_epochs=5"])
    _simulate(cfg, 6)
    rounds = read_metrics(next((tmp_path / "results").glob("*/*")))
    for rec in rounds[1:]:
        assert rec["clients_sampled"] == 6 and rec["clients_used"] == 2 and not rec.get("skipped")
        reasons = " | ".join(rec["rejected"])
        assert "NaN/Inf" in reasons and "failed" in reasons and "parameter names do not match" in reasons
        assert "delta norm" in reasons and len(rec["rejected"]) == 4
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.1  # the honest clients still learn


@pytest.mark.slow
def test_too_few_good_replies_skip_the_round_without_crashing(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, FAULTS, "strategy.min_clients=3", "rounds=1"])
    _simulate(cfg, 6)
    run_dir = next((tmp_path / "results").glob("*/*"))
    rounds = read_metrics(run_dir)
    assert rounds[1]["skipped"] and rounds[1]["clients_used"] == 2
    assert rounds[1]["accuracy"] == rounds[0]["accuracy"]  # the global model did not move
    assert (run_dir / "summary.json").is_file()


class _TimedGrid:
    """The SuperLink as ``gather`` sees it: each node's reply becomes pullable ``delay[node]`` seconds
    after the push (None: never)."""

    def __init__(self, delays: dict[int, float | None], reply):
        self.delays, self.reply, self.pushed_at, self.ids = delays, reply, None, {}

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        for i, m in enumerate(messages):
            m.metadata.message_id = f"m{i}"
            self.ids[m.metadata.message_id] = m.metadata.dst_node_id
        return list(self.ids)

    def pull_messages(self, message_ids):
        now = time.monotonic() - self.pushed_at
        out = []
        for mid in message_ids:
            delay = self.delays[self.ids[mid]]
            if delay is not None and now >= delay:
                out.append(self.reply(self.ids[mid], mid))
        return out


def test_a_slow_client_is_left_behind_at_the_round_timeout():
    """The server takes the prompt replies, stops waiting at strategy.round_timeout and counts the late
    client as missing (its reply, ready after the timeout, is never pulled). A fake SuperLink with
    timed replies: a simulation's timing under load is not what this tests (the slow fault itself, below)."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    from fedllm.apps.payload import DELTA, METRICS
    from fedllm.apps.replies import Replies, gather
    from fedllm.core.vectors import Layout

    layout = Layout.of({"w": torch.zeros(3)})

    def reply(node, message_id):
        meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id=message_id,
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
        return Message(metadata=meta, content=RecordDict({DELTA: ArrayRecord(torch_state_dict={"w": torch.ones(3) * node}),
                                                          METRICS: MetricRecord({"num-examples": 5, "partition": node})}))

    grid = _TimedGrid({1: 0.0, 2: 0.2, 3: 3.0}, reply)
    messages = [SimpleNamespace(metadata=SimpleNamespace(message_id="", dst_node_id=n)) for n in (1, 2, 3)]
    started = time.monotonic()
    out = gather(grid, messages, Replies([1, 2, 3]), layout, {}, timeout=1.0, outlier_ratio=None, rnd=1)
    waited = time.monotonic() - started
    assert 1.0 <= waited < 3.0  # it moved on at the timeout, not when the slow reply came
    assert sorted(u.node_id for u in out.updates) == [1, 2] and out.missing == [3] and not out.rejected
    assert out.phases["wait_for_clients"] >= 0.95


def test_the_slow_fault_replies_late_and_unchanged():
    delta = {"a": torch.tensor([1.0, -2.0])}
    started = time.monotonic()
    out = apply_fault(FaultSpec(kind="slow", clients=[0], delay=0.3), delta, {}, seed=0)
    assert time.monotonic() - started >= 0.3 and out is delta


@pytest.mark.slow
def test_median_survives_sign_flipping_clients_that_break_plain_averaging(tiny_overrides, tmp_path):
    """20% Byzantine clients (1 of 5, sign-flipped x4); the benchmark is experiments/byzantine/."""
    final = {}
    for rule in ("fedavg", "median"):
        out = tmp_path / rule
        cfg = load_config(None, [*tiny_overrides, "client.faults=[{kind: sign_flip, clients: [0], scale: 4}]",
                                 f"strategy.name={rule}", f"output.dir={out}", "rounds=3"])
        _simulate(cfg, 5)
        rounds = read_metrics(next(out.glob("*/*")))
        final[rule] = (rounds[0]["accuracy"], rounds[-1]["accuracy"])
    assert final["median"][1] > final["median"][0] + 0.15  # robust: keeps learning
    assert final["median"][1] > final["fedavg"][1] + 0.1  # plain averaging is dragged back


def test_replies_pulled_together_are_each_freed_once_taken():
    """One pull may return every reply of a round (64 full-model payloads in simulation, where all
    wait in the server's own process): each must be dropped as soon as it is taken, not held until
    the last is. A fake SuperLink hands out 4 replies in one pull; when each is taken, the ones
    taken before it are gone."""
    import gc
    import weakref
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    from fedllm.apps.payload import DELTA, METRICS
    from fedllm.apps.replies import Replies, gather
    from fedllm.core.vectors import Layout

    layout = Layout.of({"w": torch.zeros(3)})

    def reply(node, message_id):
        meta = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id=message_id,
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
        return Message(metadata=meta, content=RecordDict({DELTA: ArrayRecord(torch_state_dict={"w": torch.ones(3) * node}),
                                                          METRICS: MetricRecord({"num-examples": 5})}))

    taken, alive_before = [], []

    class Watched(Replies):
        def take(self, node, message, layout, stat_layouts):
            gc.collect()
            alive_before.append(sum(ref() is not None for ref in taken))
            taken.append(weakref.ref(message))
            super().take(node, message, layout, stat_layouts)

    grid = _TimedGrid({n: 0.0 for n in (1, 2, 3, 4)}, reply)
    messages = [SimpleNamespace(metadata=SimpleNamespace(message_id="", dst_node_id=n)) for n in (1, 2, 3, 4)]
    out = gather(grid, messages, Watched([1, 2, 3, 4]), layout, {}, timeout=5.0, outlier_ratio=None, rnd=1)
    assert sorted(u.node_id for u in out.updates) == [1, 2, 3, 4]
    assert alive_before == [0, 0, 0, 0]
