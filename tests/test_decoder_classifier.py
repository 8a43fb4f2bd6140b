"""Classification with a decoder LM (Llama architecture): its sequence-classification head, adapters
placed by architecture, target patterns checked against the model's own layer names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedllm.apps.client_round import train_round
from fedllm.apps.payload import DELTA, METRICS, round_content
from fedllm.config import load_config
from fedllm.workloads import workload_for
from tests.test_client_app import _context


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama causal LM saved as a model folder (random weights, MiniLM's tokenizer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedllm.core.store import embedded_model_dir

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _overrides(folder: Path) -> list[str]:
    return [f"model.name={folder}", "model.max_length=32", "data.tasks=[topic]", "data.max_train_per_task=300",
            "data.max_test_per_task=60", "peft.target_modules=[q_proj, v_proj]", "peft.adapter_size=4",
            "peft.global_patterns=[adapter_, score]", "peft.local_patterns=[lora_]", "strategy.name=personalized",
            "client.lr=0.01", "client.max_steps=5"]


def test_a_decoder_classifies_from_its_score_head_with_adapters_at_houlsbys_places(tiny_llama):
    workload = workload_for(load_config(None, _overrides(tiny_llama)))
    bundle = workload.build_model()
    assert type(bundle.model.base_model.model).__name__ == "LlamaForSequenceClassification"
    wrapped = {n.rpartition(".adapter_down")[0].split(".")[-1] for n in bundle.groups.global_names if "adapter_down" in n}
    assert wrapped == {"o_proj", "down_proj"}  # after attention and after the feed-forward block
    assert any(".score." in n for n in bundle.groups.global_names)  # the head is shared
    assert bundle.groups.local_names and all("lora_" in n for n in bundle.groups.local_names)
    # adapters start as the identity: the wrapped model computes what the unwrapped one does
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=4)
    plain.score.weight.data.copy_(dict(bundle.model.named_parameters())[
        next(n for n in bundle.groups.global_names if n.endswith("score.modules_to_save.default.weight"))])
    enc = bundle.tokenizer(["the match ended in a draw", "rain all day"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(bundle.model(**enc).logits, plain(**enc).logits, atol=1e-6)


def test_a_client_round_trains_and_sends_the_adapters_and_head_only(tiny_llama):
    cfg = load_config(None, _overrides(tiny_llama))
    server = workload_for(cfg).build_model()
    reply = train_round(round_content(server.initial_global, cfg.to_json(), 1, 0), _context(0))
    sent = reply.array_records[DELTA].to_torch_state_dict()
    assert list(sent) == list(server.groups.global_names)
    assert any(torch.count_nonzero(d) for d in sent.values())
    assert reply.metric_records[METRICS]["steps"] == 5


def test_target_patterns_that_match_nothing_name_the_models_layers(tiny_llama):
    names = "down_proj, gate_proj, k_proj, o_proj, q_proj, score, up_proj, v_proj"
    bert_targets = load_config(None, [*_overrides(tiny_llama), "peft.target_modules=[query, value]"])
    with pytest.raises(ValueError, match=rf"peft.target_modules \['query', 'value'\] match no linear layer of this "
                                         rf"'llama' model; its linear layers: {names}"):
        workload_for(bert_targets).build_model()
    bert_adapters = load_config(None, [*_overrides(tiny_llama), "peft.adapter_targets=[output.dense]"])
    with pytest.raises(ValueError, match=rf"peft.adapter_targets \['output.dense'\] match no linear layer .*{names}"):
        workload_for(bert_adapters).build_model()


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_predictions_batched_by_length_are_each_examples_own_unpadded_prediction(model, tiny_llama):
    """predict() batches by text length; each prediction must still be the example's own, in the
    examples' order, as a forward pass of that example alone (no padding at all) gives it."""
    from fedllm.core.bundle import forward_logits
    from fedllm.workloads.classification.metrics import predict

    name, targets = (str(tiny_llama), "[q_proj, v_proj]") if model == "tiny-llama" else (model, "[query, value]")
    workload = workload_for(load_config(None, [f"model.name={name}", "model.max_length=32", f"peft.target_modules={targets}",
                                               "data.tasks=[sentiment, topic]", "data.max_test_per_task=24"]))
    bundle = workload.build_model()
    test = workload.test
    lengths = {len(t) for t in test.texts}
    assert len(lengths) > 5  # mixed lengths, so batching by length reorders them
    preds, loss = predict(bundle, bundle.model, workload.suite, test, 7, 32)
    bundle.model.eval()
    with torch.no_grad():
        alone = [forward_logits(bundle, bundle.model, [x], [t], workload.suite.label_ranges, 32)[0]
                 for x, t in zip(test.texts, test.tasks)]
    logits = torch.stack(alone)
    assert preds.tolist() == logits.argmax(dim=-1).tolist()
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(test.labels), reduction="sum")
    assert loss == pytest.approx(float(expected), rel=1e-4)
