"""The client's round function, called directly (no Flower run needed)."""

import pytest
import torch
from flwr.app import Context, RecordDict

from fedllm.apps.client_round import LOCAL_STATE, train_round
from fedllm.apps.payload import DELTA, METRICS, round_content
from fedllm.config import load_config
from fedllm.workloads.classification.data import load_suite
from fedllm.workloads.classification.models import build_bundle
from tests.conftest import TINY_OVERRIDES

LORA_TINY = [o for o in TINY_OVERRIDES if not o.startswith("peft.")] + ["client.lr=0.01", "client.max_steps=5"]


def _context(partition_id: int = 0) -> Context:
    return Context(run_id=1, node_id=partition_id + 10, node_config={"partition-id": partition_id, "num-partitions": 3},
                   state=RecordDict(), run_config={})


def _global(cfg):
    suite = load_suite(cfg.data, cfg.seed)
    return build_bundle(cfg, suite.label_names)


def test_only_the_global_group_leaves_the_client():
    cfg = load_config(None, LORA_TINY)
    server = _global(cfg)
    reply = train_round(round_content(server.initial_global, cfg.to_json(), 1, 0), _context())
    assert set(reply.keys()) == {DELTA, METRICS}
    sent = reply.array_records[DELTA].to_torch_state_dict()
    assert list(sent) == list(server.groups.global_names)
    assert all("lora_" in n or "classifier" in n for n in sent)
    all_params = dict(server.model.named_parameters())
    assert sum(t.numel() for t in sent.values()) < 0.2 * sum(p.numel() for p in all_params.values())
    assert any(torch.count_nonzero(d) > 0 for d in sent.values())  # it trained
    metrics = reply.metric_records[METRICS]
    assert metrics["num-examples"] in (166, 167) and metrics["steps"] == 5  # (600 - 100 validation) / 3


def test_local_group_stays_on_the_client_and_persists_across_rounds():
    # LoRA A/B of the query projections are global; those of the value projections are local.
    cfg = load_config(None, [*LORA_TINY, "peft.global_patterns=['query.lora_', classifier]",
                             "peft.local_patterns=['value.lora_']"])
    server = _global(cfg)
    assert server.groups.local_names and all("value.lora_" in n for n in server.groups.local_names)
    context = _context(1)
    reply = train_round(round_content(server.initial_global, cfg.to_json(), 1, 0), context)
    sent = reply.array_records[DELTA].to_torch_state_dict()
    assert not any("value.lora_" in n for n in sent)
    local_1 = context.state.array_records[LOCAL_STATE].to_torch_state_dict()
    assert set(local_1) == set(server.groups.local_names)
    lora_b = [n for n in local_1 if "lora_B" in n][0]  # LoRA B starts at zero, so any change is training
    assert torch.count_nonzero(local_1[lora_b]) > 0
    train_round(round_content(server.initial_global, cfg.to_json(), 2, 0), context)
    local_2 = context.state.array_records[LOCAL_STATE].to_torch_state_dict()
    assert not torch.equal(local_1[lora_b], local_2[lora_b])
    # A different client starts from the initial local group, not from client 1's.
    other = _context(2)
    train_round(round_content(server.initial_global, cfg.to_json(), 1, 0), other)
    assert not torch.equal(other.state.array_records[LOCAL_STATE].to_torch_state_dict()[lora_b], local_2[lora_b])


def test_bottleneck_adapters_start_as_identity_and_are_the_sent_group():
    cfg = load_config(None, [*LORA_TINY, "peft.method=none", "peft.adapter_size=4"])
    bundle = _global(cfg)
    assert bundle.groups.global_names and all(("adapter_" in n) or ("classifier" in n) for n in bundle.groups.global_names)
    assert sum("adapter_up" in n for n in bundle.groups.global_names) == 2 * 2 * 2  # 2 layers x 2 blocks x (w, b)
    plain = load_config(None, [*LORA_TINY, "peft.method=none"])
    a, b = _global(cfg).model, _global(plain).model
    x = {"input_ids": torch.tensor([[101, 2023, 2003, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.allclose(a(**x).logits, b(**x).logits, atol=1e-6)  # zero-initialised up-projection
    reply = train_round(round_content(bundle.initial_global, cfg.to_json(), 1, 0), _context())
    sent = reply.array_records[DELTA].to_torch_state_dict()
    assert any(torch.count_nonzero(d) > 0 for n, d in sent.items() if "adapter_" in n)


def test_a_device_trains_on_its_own_data_file(tmp_path):
    import json

    from fedllm.core.embedded_tasks import generate
    from fedllm.core.errors import DataError

    rows = generate("topic", "device", 40, seed=9)
    names = ["sports", "weather", "food", "technology"]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps({"text": t, "label": names[y]}) for t, y in rows))
    cfg = load_config(None, LORA_TINY)
    server = _global(cfg)
    device = Context(run_id=1, node_id=77, node_config={"data-path": str(tmp_path / "mine.jsonl"), "task": "topic"},
                     state=RecordDict(), run_config={})
    reply = train_round(round_content(server.initial_global, cfg.to_json(), 1, 0), device)
    metrics = reply.metric_records[METRICS]
    assert metrics["num-examples"] == 40 and "partition" not in metrics
    bad = Context(run_id=1, node_id=78, node_config={"data-path": str(tmp_path / "mine.jsonl"), "task": "sentiment"},
                  state=RecordDict(), run_config={})
    with pytest.raises(DataError, match="task='sentiment' is not a task of this run"):
        train_round(round_content(server.initial_global, cfg.to_json(), 1, 0), bad)
    none = Context(run_id=1, node_id=79, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="lacks 'partition-id' or 'data-path'"):
        train_round(round_content(server.initial_global, cfg.to_json(), 1, 0), none)


def test_the_sample_depends_on_partitions_not_on_node_ids():
    import random

    from fedllm.apps.sampling import sample_clients

    strategy = load_config(None, "strategy.fraction_train=0.5").strategy
    first = {101: "p0", 7: "p1", 55: "p2", 9: "p3"}
    second = {3: "p0", 999: "p1", 12: "p2", 40: "p3"}  # the same partitions behind other node ids
    picks = [[ids[n] for n in sample_clients(strategy, ids, random.Random(5))] for ids in (first, second)]
    assert picks[0] == picks[1] and len(picks[0]) == 2
    poisson = load_config(None, "strategy.fraction_train=0.5 strategy.sampling=poisson").strategy
    draws = [sample_clients(poisson, first, random.Random(s)) for s in range(200)]
    assert 1.6 < sum(map(len, draws)) / 200 < 2.4 and {len(d) for d in draws} >= {0, 1, 2, 3}  # Binomial(4, 0.5)


class _Grid:
    """The SuperLink as the ServerApp sees it after a restart: it lists node ids, some of whose
    SuperNodes have not reconnected (they answer nothing) or are gone (the SuperLink answers an error)."""

    def __init__(self, partitions: dict[int, int | None], silent: set[int], gone: set[int]):
        self.partitions, self.silent, self.gone, self.asked = partitions, silent, gone, []

    def get_node_ids(self):
        return set(self.partitions)

    def send_and_receive(self, messages, timeout=None):
        from types import SimpleNamespace

        from flwr.app import MetricRecord

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.asked.append(node)
            if node in self.silent:
                continue
            part = self.partitions[node]
            facts = {} if part is None else {"partition": part, "partitions": 4}
            replies.append(SimpleNamespace(
                has_error=lambda node=node: node in self.gone, metadata=SimpleNamespace(src_node_id=node),
                content=SimpleNamespace(metric_records={METRICS: MetricRecord(facts)})))
        return replies


def test_a_node_that_does_not_say_who_it_is_is_not_sampled_and_is_asked_again(tmp_path, monkeypatch):
    """A listed node that does not answer the identity query (a SuperNode not yet reconnected after a
    SuperLink restart), or for which the SuperLink answers that it is gone, is neither sampled under
    its node id nor remembered as a device: it is asked again, and once it answers it is its partition."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedllm.apps.federated_run import FederatedRun

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ServerApp process has
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = load_config(None, [*TINY_OVERRIDES, "strategy.min_clients=2", f"output.dir={tmp_path}"])
    grid = _Grid({11: 0, 12: 1, 13: 2, 14: None}, silent={12}, gone={13})
    run = FederatedRun(grid, cfg, echo=lambda line: None)
    assert run.nodes.available(2, timeout=0) == [11, 14]
    assert run.nodes.identities == {11: "p0", 14: "n14"}  # 14 answered without a partition: a device
    assert run.nodes.declared_partitions == 4
    grid.silent, grid.gone, grid.asked = set(), set(), []
    assert run.nodes.available(2, timeout=0) == [11, 12, 13, 14]
    assert sorted(grid.asked) == [12, 13]  # only the unknown ones are asked again
    assert run.nodes.identities == {11: "p0", 12: "p1", 13: "p2", 14: "n14"}
