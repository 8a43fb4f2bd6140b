"""R-MTLLMF pieces: frozen label-embedding head, frozen embeddings never sent, WD error, realignment."""

import json

import pytest
import torch
from fedllm.strategies.realign import normalisation_parameter_names, realign, realign_parameters
from flwr.simulation import run_simulation

from fedllm.apps.client_app import app as client_app
from fedllm.apps.client_round import train_round
from fedllm.apps.payload import DELTA, METRICS, round_content
from fedllm.apps.server_app import make_server_app
from fedllm.config import ConfigError, load_config
from fedllm.results.writer import read_metrics
from fedllm.workloads.classification import Classification
from fedllm.workloads.classification.data import load_suite
from fedllm.workloads.classification.metrics import disagreement
from fedllm.workloads.classification.models import build_bundle
from tests.test_client_app import _context

TINY_FUSION = [
    "model.name=tiny-bert", "model.max_length=32", "model.head=label_embedding", "model.temperature=0.1",
    "peft.method=full", "peft.global_patterns=['*']", "peft.frozen_patterns=[embeddings]",
    "data.tasks=[topic,question]", "data.partition=task", "data.max_train_per_task=300", "data.max_test_per_task=100",
    "data.validation_per_task=50", "client.lr=0.003", "client.max_steps=30", "rounds=1",
]


def test_wd_error_is_zero_for_identical_and_one_for_disagreeing_models():
    a = torch.tensor([0, 1, 2, 1, 0])
    assert disagreement(a, a.clone()) == 0.0
    assert disagreement(a, (a + 1) % 3) == 1.0
    assert disagreement(a, torch.tensor([0, 1, 2, 0, 0])) == pytest.approx(0.2)


def test_frozen_embeddings_are_never_sent_and_the_head_is_not_trained():
    cfg = load_config(None, TINY_FUSION)
    suite = load_suite(cfg.data, cfg.seed)
    bundle = build_bundle(cfg, suite.label_names)
    assert not any("embeddings" in n for n in bundle.groups.global_names)
    assert not any("label_embeddings" in n for n, _ in bundle.model.named_parameters())  # a buffer, not a parameter
    reply = train_round(round_content(bundle.initial_global, cfg.to_json(), 1, 0), _context(0))
    sent = reply.array_records[DELTA].to_torch_state_dict()
    assert list(sent) == list(bundle.groups.global_names)
    assert not any("embeddings" in n for n in sent)
    assert reply.metric_records[METRICS]["task"] == 0  # client 0 owns task 0 under the task partition


def test_rmtllmf_requires_frozen_layers():
    with pytest.raises(ConfigError, match="peft.frozen_patterns"):
        load_config(None, [o for o in TINY_FUSION if not o.startswith("peft.frozen")] + ["strategy.name=rmtllmf"])


def test_realignment_lowers_the_few_shot_loss():
    workload = Classification(load_config(None, TINY_FUSION))
    bundle = workload.build_model()
    shots = workload.few_shot(5, seed=0)
    assert len(shots) == 10 and sorted(set(shots.tasks)) == [0, 1]
    before, after = realign(bundle.model, realign_parameters(bundle, "transmitted"),
                            lambda: workload.few_shot_loss(bundle, shots), steps=10, lr=1e-3, seed=0)
    assert after < before
    with torch.no_grad():
        assert float(workload.few_shot_loss(bundle, shots)) == pytest.approx(after)
    norms_only = workload.build_model()
    chosen = realign_parameters(norms_only, "norms_biases")
    assert chosen and all(p.numel() < 1000 for p in chosen)  # LayerNorm weights and biases only
    b2, a2 = realign(norms_only.model, chosen, lambda: workload.few_shot_loss(norms_only, shots), steps=10, lr=1e-2,
                     seed=0)
    assert a2 < b2


def test_realignment_trains_only_its_tensors_and_leaves_the_model_as_it_was():
    """The same steps as a plain AdamW loop in which every tensor takes gradients (only the chosen
    ones stepped); afterwards no gradient is left on the model and every requires_grad is as before."""
    workload = Classification(load_config(None, TINY_FUSION))
    shots = workload.few_shot(5, seed=0)
    ours, reference = workload.build_model(), workload.build_model()
    flags = {n: p.requires_grad for n, p in ours.model.named_parameters()}
    assert any(flags.values()) and not all(flags.values())  # the embeddings are frozen
    realign(ours.model, realign_parameters(ours, "norms_biases"), lambda: workload.few_shot_loss(ours, shots),
            steps=5, lr=1e-2, seed=0)
    chosen = realign_parameters(reference, "norms_biases")
    optimizer = torch.optim.AdamW(chosen, lr=1e-2, weight_decay=0.0)
    reference.model.eval()
    for p in reference.model.parameters():
        p.requires_grad_(True)
    for _ in range(5):
        loss = workload.few_shot_loss(reference, shots)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    initial, moved = workload.build_model().model, 0
    for (name, mine), theirs in zip(ours.model.named_parameters(), reference.model.parameters()):
        assert torch.allclose(mine, theirs, atol=1e-6), name
        moved += not torch.equal(mine, initial.get_parameter(name))
    assert moved == len(chosen)
    assert {n: p.requires_grad for n, p in ours.model.named_parameters()} == flags
    assert all(p.grad is None for p in ours.model.parameters())


def test_norms_are_found_by_module_type_in_any_architecture():
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=16))
    by_name = {n for n, _ in bert.named_parameters() if "LayerNorm" in n}  # BERT spells every norm LayerNorm
    assert normalisation_parameter_names(bert) == by_name and len(by_name) == 2 * (1 + 2 * 2)
    llama = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=16))
    assert normalisation_parameter_names(llama) == {
        *(f"layers.{i}.{k}.weight" for i in range(2) for k in ("input_layernorm", "post_attention_layernorm")),
        "norm.weight"}  # RMSNorm, no biases: the name rule of BERT found none of these


def test_a_decoder_pools_its_last_real_token_and_an_encoder_its_mean():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    from fedllm.core.encoders import decoder_only, last_token_pool, mean_pool

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # row 0 ends at position 1
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # left padding: both end at position 3
    assert torch.equal(last_token_pool(hidden, right), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(last_token_pool(hidden, left), hidden[:, 3])
    assert torch.allclose(mean_pool(hidden, right)[0], hidden[0, :2].mean(0))
    assert decoder_only(LlamaConfig()) and decoder_only(GPT2Config()) and not decoder_only(BertConfig())


def test_label_embedding_head_on_a_decoder_scores_the_last_token(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from fedllm.core.encoders import last_token_pool
    from fedllm.core.store import embedded_model_dir

    folder = tmp_path / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    def head_of(pooling: str):
        cfg = load_config(None, [f"model.name={folder}", "model.head=label_embedding", "data.tasks=[topic]",
                                 "peft.method=full", "peft.global_patterns=['*']", f"model.pooling={pooling}"])
        module = Classification(cfg).build_model().model
        while not hasattr(module, "label_embeddings"):
            module = module.base_model if hasattr(module, "base_model") else module.model
        return module, cfg

    head, cfg = head_of("auto")
    assert head.pooling == "last"
    texts = ["a short one", "a somewhat longer sentence than that"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = head.encoder(**enc).last_hidden_state
        expected = torch.nn.functional.normalize(last_token_pool(states, enc["attention_mask"]), dim=-1)
        logits = head(**enc).logits
    assert torch.allclose(logits, expected @ head.label_embeddings.T / cfg.model.temperature, atol=1e-5)
    assert head_of("mean")[0].pooling == "mean"


@pytest.mark.slow
def test_two_task_one_round_fusion_under_a_jammed_channel(tmp_path):
    cfg = load_config(None, [*TINY_FUSION, "strategy.name=rmtllmf", "strategy.server_lr=auto",
                             "strategy.lr_grid=[0.5,1.0]", "strategy.realign_steps=5", "eval.fusion_metrics=true",
                             "channel.kind=mimo_mac", "channel.jammer=strongest_user", "channel.solver_steps=20",
                             f"output.dir={tmp_path}"])
    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    run_dir = next(tmp_path.glob("*/*/summary.json")).parent
    final = read_metrics(run_dir)[-1]
    assert final["clients_used"] == 2 and final["server_lr"] in (0.5, 1.0)
    assert final["channel_mse"] > 0 and set(final["validation_by_lr"]) == {"0.5", "1.0"}
    assert final["realign_loss_after"] < final["realign_loss_before"]
    for name in ("topic", "question"):  # normalised accuracy: the merged model's over the task's own model's
        assert final[f"normalized_accuracy/{name}"] == pytest.approx(
            final[f"accuracy/{name}"] / final[f"individual_accuracy/{name}"])
    assert "normalized_accuracy" in final and json.loads((run_dir / "summary.json").read_text())["rounds"] == 1
