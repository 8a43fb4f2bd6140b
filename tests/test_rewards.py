"""Rewards for RL instruction tuning: rule rewards, embedded scorers, a neural reward model, the mix."""

import pytest
import torch
from fedllm.clients.rewards import build_reward, mix, normalise_batch, validate_reward


def test_normalise_batch_z_scores_and_flat_batches_give_zeros():
    z = normalise_batch([1.0, 2.0, 3.0])
    assert z == pytest.approx([-1.2247449, 0.0, 1.2247449])
    assert normalise_batch([5.0, 5.0, 5.0]) == [0.0, 0.0, 0.0]
    assert normalise_batch([7.0]) == [0.0]


def test_mix_weights_normalised_rewards_so_units_do_not_matter():
    scores = {"short": [1.0, 0.0, 0.5], "polite": [0.50, 0.52, 0.51]}  # polite: tiny spread
    raw = mix(scores, {"short": 1.0, "polite": 1.0}, normalise=False)
    assert raw == pytest.approx([1.5, 0.52, 1.01])
    z = mix(scores, {"short": 0.0, "polite": 1.0}, normalise=True)
    assert z == pytest.approx(normalise_batch([0.50, 0.52, 0.51]))  # same pull as a wide-spread reward
    both = mix(scores, {"short": 0.5, "polite": 0.5}, normalise=True)
    assert both[0] == pytest.approx(0.5 * 1.2247449 + 0.5 * -1.2247449)
    with pytest.raises(KeyError, match="helpful"):
        mix(scores, {"helpful": 1.0}, normalise=True)


def test_rule_rewards():
    length = build_reward({"kind": "length", "target": 2})
    assert length([""] * 4, ["paris .", "paris", "the answer is paris", ""], [""] * 4) == [1.0, 0.5, 0.0, 0.0]
    exact = build_reward({"kind": "exact_answer"})
    assert exact(["q"] * 3, ["it is Paris .", "rome", "new york city"], ["paris", "paris", "new york"]) == [1.0, 0.0, 1.0]
    fmt = build_reward({"kind": "format", "pattern": r"\.$"})
    assert fmt(["q", "q"], ["paris .", "paris"], ["", ""]) == [1.0, 0.0]


def test_reward_specs_are_validated_by_kind():
    with pytest.raises(ValueError, match="rl.rewards.short.tarket: unknown key"):
        validate_reward("short", {"kind": "length", "tarket": 3})
    with pytest.raises(ValueError, match="unknown reward 'lenght'; allowed: exact_answer, format, length"):
        validate_reward("short", {"kind": "lenght"})
    with pytest.raises(ValueError, match="needs a 'kind'"):
        validate_reward("short", {"target": 3})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        build_reward({"kind": "format", "pattern": "("})


def test_embedded_scorers_rank_real_sentences():
    tone = build_reward({"kind": "tone"})
    friendly, rude = tone(["q", "q"], ["paris . i hope this helps , have a great day !",
                                       "paris , obviously . what a silly question ."], ["", ""])
    assert friendly > 0.5 > rude
    sim = build_reward({"kind": "similarity"})
    close, far = sim(["q", "q"], ["the capital of france is paris", "bananas are yellow"], ["paris", "paris"])
    assert close > far + 0.2


def test_reward_model_from_a_local_folder(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedllm.core.store import embedded_model_dir

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    model.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(str(embedded_model_dir())).save_pretrained(tmp_path / "rm")
    rm = build_reward({"kind": "reward_model", "path": str(tmp_path / "rm"), "label": 1})
    scores = rm(["what is two plus two ?"] * 2, ["four .", "five , obviously ."], ["four"] * 2)
    enc = AutoTokenizer.from_pretrained(tmp_path / "rm")(["what is two plus two ?"], ["four ."], return_tensors="pt")
    assert scores[0] == pytest.approx(float(model.eval()(**enc).logits[0, 1]), abs=1e-5)
    assert scores[0] != scores[1]
    with pytest.raises(ValueError, match="label 2 out of range for 2 outputs"):
        build_reward({"kind": "reward_model", "path": str(tmp_path / "rm"), "label": 2})
    with pytest.raises(ValueError, match="cannot load"):
        build_reward({"kind": "reward_model", "path": str(tmp_path / "missing")})
