"""A simulation's worker prepares its first round from the identity query (fedllm/apps/prewarm.py)."""

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedllm.apps import prewarm
from fedllm.apps.client_round import train_round
from fedllm.apps.federated_run import FederatedRun
from fedllm.apps.payload import CONFIG, round_content
from fedllm.config import ConfigError, load_config
from fedllm.workloads.classification import models


def _context(partition_id: int) -> Context:
    return Context(run_id=1, node_id=partition_id + 10, node_config={"partition-id": partition_id, "num-partitions": 3},
                   state=RecordDict(), run_config={})


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """Every model build in this process (the worker's model cache emptied first)."""
    built: list[str] = []
    real = models.build_bundle

    def counting(cfg, label_names):
        built.append(cfg.model.name)
        return real(cfg, label_names)

    monkeypatch.setattr(models, "build_bundle", counting)
    monkeypatch.setattr(models, "_CACHE", models.BundleCache())
    monkeypatch.setattr(prewarm, "_started", set())
    return built


def test_the_query_prepares_the_first_round_in_a_ray_worker(tiny_overrides, builds, monkeypatch):
    cfg = load_config(None, [*tiny_overrides, "client.max_steps=2"])
    run = FederatedRun(None, cfg, echo=lambda _: None)
    assert run.nodes.query[CONFIG]["experiment"] == cfg.to_json()  # the server's query names the experiment
    builds.clear()  # the server's own model
    monkeypatch.setattr(prewarm, "in_ray_worker", lambda: True)
    assert prewarm.start(run.nodes.query, _context(0))
    prewarm.wait()
    assert builds == ["tiny-bert"]  # built while the server would evaluate round 0
    assert not prewarm.start(run.nodes.query, _context(0))  # the same client again: nothing more to do
    train_round(round_content(run.global_params, cfg.to_json(), 1, 0), _context(0))
    assert builds == ["tiny-bert"]  # the round used the prepared model instead of building one


def test_nothing_is_prepared_where_the_process_ends_with_the_message(tiny_overrides, builds):
    cfg = load_config(None, tiny_overrides)
    query = RecordDict({CONFIG: ConfigRecord({"experiment": cfg.to_json(), "num-partitions": 3})})
    assert not prewarm.in_ray_worker()  # pytest's process: like Flower's process per message
    assert not prewarm.start(query, _context(0))
    assert not prewarm.start(RecordDict(), _context(0))  # an older server's empty query
    assert builds == []


def test_a_failed_preparation_is_left_to_the_round_to_report(tiny_overrides, builds, monkeypatch):
    monkeypatch.setattr(prewarm, "in_ray_worker", lambda: True)
    bad = RecordDict({CONFIG: ConfigRecord({"experiment": '{"rounds": -1}', "num-partitions": 3})})
    assert prewarm.start(bad, _context(1))
    prewarm.wait()  # no error here: the server hears it from the round
    with pytest.raises(ConfigError, match="rounds"):
        train_round(RecordDict({CONFIG: bad[CONFIG]}), _context(1))
