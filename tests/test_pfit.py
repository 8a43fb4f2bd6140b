"""PFIT: instruction data, the tiny policy and its cache, the RL trainer, the client split, a real run."""

import pytest
import torch
from fedllm.clients import TRAINERS, TrainContext
from fedllm.clients.rewards import build_reward
from flwr.app import Context, RecordDict

from fedllm.apps.client_round import LOCAL_STATE, train_round
from fedllm.apps.payload import DELTA, METRICS, round_content
from fedllm.config import ConfigError, load_config
from fedllm.workloads.instruction_rl.evaluation import client_preference, client_prompts
from fedllm.workloads.instruction_rl.instructions import STYLES, embedded_instructions, embedded_vocabulary
from fedllm.workloads.instruction_rl.policy import build_policy, generate, kl_to_reference, word_tokenizer

PFIT = ["model.name=tiny-gpt2", "client.trainer=rl", "rl={}", "peft.target_modules=[c_attn, c_fc]",
        "peft.global_patterns=[attn.c_attn.lora_]", "peft.local_patterns=[mlp.c_fc.lora_]",
        "client.batch_size=16", "client.lr=0.003", "data.num_clients=2"]


def test_embedded_instructions_hold_out_questions_and_show_every_style():
    train, test = embedded_instructions(seed=0)
    assert len(train) > 100 and len(test) > 20
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    for item in train[:20]:
        assert len(item.responses) == len(STYLES) and all(item.reference in r.split() for r in item.responses)
    tok = word_tokenizer(embedded_vocabulary())
    text = test[0].prompt + " " + test[0].responses[1]
    assert tok.decode(tok(text)["input_ids"]) == text  # word level: lossless on the embedded vocabulary


def test_rl_config_is_validated():
    with pytest.raises(ConfigError, match="client.trainer 'rl' and an 'rl:' section go together"):
        load_config(None, ["rl={}"])
    with pytest.raises(ConfigError, match=r"rl.preferences.0: unknown reward\(s\) \['kind'\]"):
        load_config(None, [*PFIT, "rl.preferences=[{kind: 1.0}]"])
    with pytest.raises(ConfigError, match="rl.rewards.short.tarket: unknown key"):
        load_config(None, [*PFIT, "rl.rewards={short: {kind: length, tarket: 2}}", "rl.preferences=[{short: 1}]"])
    with pytest.raises(ConfigError, match="multiple of rl.num_generations"):
        load_config(None, [*PFIT, "client.batch_size=10"])


def test_clients_split_the_prompts_and_hold_their_own_preference():
    cfg = load_config(None, [*PFIT, "data.num_clients=3"])
    parts = [client_prompts(cfg, p, 3) for p in range(3)]
    prompts = [{i.prompt for i in part} for part in parts]
    assert not (prompts[0] & prompts[1]) and sum(map(len, prompts)) == len(embedded_instructions(0)[0])
    assert client_preference(cfg.rl, 0, 0) == {"correct": 0.5, "concise": 0.5}
    assert client_preference(cfg.rl, 3, 0) == {"correct": 0.5, "polite": 0.5}  # cycles through the list
    drawn = load_config(None, [*PFIT, "rl.preference_alpha=0.5"]).rl
    w0, w1 = client_preference(drawn, 0, 0), client_preference(drawn, 1, 0)
    assert set(w0) == set(drawn.rewards) and sum(w0.values()) == pytest.approx(1.0) and w0 != w1
    assert w0 == client_preference(drawn, 0, 0)  # seeded


def test_tiny_policy_is_instruction_tuned_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import fedllm.workloads.instruction_rl.policy as policy

    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    cfg = load_config(None, [*PFIT, "rl.sft_steps=5"])
    first = build_policy(cfg)
    assert len(list((tmp_path / "policies").glob("tiny-gpt2-*/done"))) == 1
    monkeypatch.setattr(policy, "supervised_tune", lambda *a, **k: pytest.fail("tuned again instead of cached"))
    second = build_policy(cfg)
    for (n1, p1), (n2, p2) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.fixture(scope="module")
def policy_cfg():
    return load_config(None, [*PFIT, "client.max_steps=15"])


def test_the_instruction_tuned_policy_answers_held_out_questions(policy_cfg):
    bundle = build_policy(policy_cfg)
    _, test = embedded_instructions(0)
    greedy = generate(bundle, [t.prompt for t in test], 20)
    correct = build_reward({"kind": "exact_answer"})([t.prompt for t in test], greedy, [t.reference for t in test])
    assert sum(correct) / len(correct) > 0.6
    sampled = generate(bundle, [t.prompt for t in test] * 2, 20, sample=True, seed=0)
    styles = {next((s for s, tpl in STYLES.items() if c.startswith(tpl.split("{answer}")[0]) and tpl[0] != "{"),
                   "short") for c in sampled}
    assert len(styles) >= 3  # the reference policy mixes answer styles: preferences have something to pick
    assert kl_to_reference(bundle, [t.prompt for t in test], sampled[: len(test)]) == pytest.approx(0.0, abs=1e-5)


def test_rl_trainer_learns_to_answer_briefly(policy_cfg):
    bundle = build_policy(policy_cfg)
    train, _ = embedded_instructions(0)
    length = build_reward({"kind": "length", "target": 2})

    def mean_length_reward() -> float:
        prompts = [t.prompt for t in train[:48]]
        return sum(length(prompts, generate(bundle, prompts, 20, sample=True, seed=7), prompts)) / len(prompts)

    before_params = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if p.requires_grad}
    before = mean_length_reward()
    ctx = TrainContext(policy_cfg.client, [], 0, seed=0, preference={"concise": 1.0}, rl=policy_cfg.rl)
    result = TRAINERS.get("rl")(bundle, train, ctx)
    after = mean_length_reward()
    assert result.steps == 15 and result.extra["kl"] > 0
    assert after > before + 0.1, (before, after)
    assert set(bundle.model.peft_config) == {"default"}  # TRL's reference copy is gone
    changed = [n for n, p in bundle.model.named_parameters() if p.requires_grad and not torch.equal(p, before_params[n])]
    assert any("c_attn" in n for n in changed) and any("c_fc" in n for n in changed)


def test_the_local_lora_never_leaves_the_client(policy_cfg):
    cfg = load_config(None, [*PFIT, "client.max_steps=2"])
    server = build_policy(cfg)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                      run_config={})
    reply = train_round(round_content(server.initial_global, cfg.to_json(), 1, 2), context)
    sent = set(reply.array_records[DELTA].to_torch_state_dict())
    assert sent == set(server.groups.global_names) and not any("c_fc" in n for n in sent)
    kept = context.state.array_records[LOCAL_STATE].to_torch_state_dict()
    assert set(kept) == set(server.groups.local_names)
    assert any(not torch.equal(kept[n], server.initial_local[n]) for n in kept)  # it trained, and stayed here
    assert reply.metric_records[METRICS]["num-examples"] == len(client_prompts(cfg, 1, 2))


@pytest.mark.slow
def test_two_round_two_client_pfit_run(tmp_path):
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.server_app import make_server_app
    from fedllm.results.writer import read_metrics

    cfg = load_config(None, [*PFIT, "rounds=2", "client.max_steps=4", "strategy.name=personalized",
                             "eval.federated=true", f"output.dir={tmp_path}"])
    done = []
    run_simulation(server_app=make_server_app(cfg, on_done=done.append), client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    rounds = read_metrics(done[0])
    final = rounds[-1]
    assert final["clients_used"] == 2 and len(final["preference_matrix"]) == 2
    assert all(len(row) == 2 for row in final["preference_matrix"].values())
    assert final["client_reward"]["p0"] == pytest.approx(final["preference_matrix"]["p0"][0])
    assert final["reward"] == pytest.approx((final["reward/p0"] + final["reward/p1"]) / 2)  # the mean over preferences
    assert "reward" in rounds[0]
    assert (done[0] / "samples.jsonl").read_text().count('"round": 2') == 4
    summary = __import__("json").loads((done[0] / "summary.json").read_text())
    assert summary["final_reward"] == pytest.approx(final["reward"])


def test_a_causal_lm_from_a_local_folder_is_loaded_tuned_and_generates(tmp_path):
    """The real loading path (AutoModelForCausalLM/AutoTokenizer.from_pretrained) on a saved model."""
    from fedllm.workloads.instruction_rl.policy import tiny_gpt2

    tok = word_tokenizer(embedded_vocabulary())
    tiny_gpt2(len(tok), seed=3).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    cfg = load_config(None, [*PFIT, f"model.name={tmp_path / 'lm'}", "client.max_steps=2"])
    bundle = build_policy(cfg)
    assert set(bundle.groups.global_names) and all("c_attn" in n for n in bundle.groups.global_names)
    out = generate(bundle, ["question : what colour is snow ? answer :"], 5)
    assert len(out) == 1 and isinstance(out[0], str)
    result = TRAINERS.get("rl")(bundle, embedded_instructions(0)[0][:8],
                                TrainContext(cfg.client, [], 0, seed=0, preference={"concise": 1.0}, rl=cfg.rl))
    assert result.steps == 2
    with pytest.raises(ValueError, match="cannot load a causal LM offline"):
        build_policy(load_config(None, [*PFIT, f"model.name={tmp_path / 'nothing'}"]))
