"""PFTT pieces: the personal part stays local and keeps learning; global part averaged; proximal term."""

import pytest
import torch
from fedllm.clients import proximal_term
from flwr.simulation import run_simulation

from fedllm.apps.client_app import app as client_app
from fedllm.apps.server_app import make_server_app
from fedllm.config import ConfigError, DataSection, TaskSpec, load_config
from fedllm.results.writer import read_metrics
from fedllm.workloads import workload_for
from fedllm.workloads.classification.data import client_examples

# Tiny PFTT: bottleneck adapters + head are the global part, LoRA on query/value the local part.
TINY_PFTT = [
    "model.name=tiny-bert", "model.max_length=32", "peft.method=lora", "peft.r=4", "peft.adapter_size=8",
    "peft.global_patterns=[adapter_, classifier]", "peft.local_patterns=[lora_]",
    "data.tasks=[topic]", "data.partition=dirichlet", "data.alpha=0.3", "data.max_train_per_task=400",
    "data.max_test_per_task=200", "client.lr=0.005", "client.max_steps=8", "strategy.name=personalized",
    "eval.federated=true", "rounds=3",
]


def test_proximal_term_is_zero_at_the_anchor_and_grows_with_distance():
    model = torch.nn.Linear(3, 2)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert float(proximal_term(model, anchor, mu=0.5)) == 0.0
    with torch.no_grad():
        model.weight += 1.0
    assert float(proximal_term(model, anchor, mu=0.5)) == pytest.approx(0.5 * 0.5 * 6)


def test_personalized_needs_a_personal_part():
    """'personalized' with nothing kept on the clients would silently be FedAvg: a config error."""
    with pytest.raises(ConfigError, match="strategy 'personalized' keeps a personal part on every client"):
        load_config(None, "strategy.name=personalized")
    assert load_config(None, "strategy.name=personalized peft.local_patterns=[lora_]").peft.local_patterns == ["lora_"]


def test_local_only_sends_nothing_and_is_validated():
    cfg = load_config(None, ["strategy.name=local_only", "peft.global_patterns=[]", "peft.local_patterns=[lora_, classifier]"])
    assert cfg.strategy.name == "local_only"
    with pytest.raises(ConfigError, match="local_only"):
        load_config(None, "strategy.name=local_only")
    with pytest.raises(ConfigError, match="local_only"):
        load_config(None, "peft.global_patterns=[] peft.local_patterns=[lora_, classifier]")


def test_test_partitions_follow_the_clients_label_mix():
    section = DataSection(tasks=[TaskSpec(name="topic")], partition="dirichlet", alpha=0.1,
                          max_train_per_task=2000, max_test_per_task=1000)
    for pid in range(4):
        train = client_examples(section, pid, 4, seed=0)
        test = client_examples(section, pid, 4, seed=0, split="test")
        top_train = max(set(train.labels), key=train.labels.count)
        assert max(set(test.labels), key=test.labels.count) == top_train


@pytest.mark.slow
def test_personal_lora_persists_and_keeps_changing_across_rounds(tmp_path):
    cfg = load_config(None, [*TINY_PFTT, "eval.centralized=false", f"output.dir={tmp_path}"])  # personal eval only
    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    records = read_metrics(next(tmp_path.glob("*/*")))[1:]
    norms = [r["client_local_norm"] for r in records]
    assert all(set(n) == {"p0", "p1", "p2"} for n in norms)
    for client in ("p0", "p1", "p2"):
        series = [n[client] for n in norms]
        assert len(set(series)) == 3, f"{client}'s local LoRA did not change every round: {series}"
    # Flower keeps each client's context.state across rounds: round r's state has seen r rounds.
    assert [r["client_local_rounds"] for r in records] == [{c: k for c in ("p0", "p1", "p2")} for k in (1, 2, 3)]
    final = records[-1]
    assert set(final["client_accuracy"]) == {"p0", "p1", "p2"}
    assert final["worst_client_accuracy"] == min(final["client_accuracy"].values())
    assert final["personalized_accuracy"] == pytest.approx(sum(final["client_accuracy"].values()) / 3)
    # exactly the adapters and the head travel (4 bytes a value); the personal LoRA never does
    bundle = workload_for(cfg).build_model()
    sent = dict(bundle.model.named_parameters())
    assert final["bytes_up_per_client"] == 4 * sum(sent[n].numel() for n in bundle.groups.global_names)
    assert not any("lora_" in n for n in bundle.groups.global_names) and bundle.groups.local_names
    assert "accuracy" not in final  # no centralised evaluation asked for, none made
