"""PFIT on the embedded real LLM (SmolLM2-135M-Instruct): chat-rendered prompts, one GRPO step, a
1-round run with 2 clients through Flower's simulation."""

from __future__ import annotations

import json

import pytest

from fedllm.config import load_config

SMOL_PFIT = [
    "model.name=smollm2-135m", "client.trainer=rl", "peft.target_modules=[q_proj, v_proj, down_proj]",
    "peft.global_patterns=[self_attn.q_proj.lora_, self_attn.v_proj.lora_]", "peft.local_patterns=[mlp.down_proj.lora_]",
    "strategy.name=personalized", "client.batch_size=4", "client.max_steps=1", "client.lr=0.0005", "rounds=1",
    "data.num_clients=2", "eval.federated=true",
    "rl={prompts: embedded_chat, max_train_prompts: 8, max_test_prompts: 3, max_new_tokens: 8, num_generations: 2,"
    " rewards: {correct: {kind: exact_answer}, concise: {kind: length, target: 4}},"
    " preferences: [{correct: 1.0, concise: 1.0}, {concise: 1.0}]}",
]


def test_chat_prompts_are_rendered_with_the_models_template(smollm2_cache, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(smollm2_cache))
    from fedllm.workloads import workload_for

    workload = workload_for(load_config(None, SMOL_PFIT))
    prompts = workload.client_data(0, 2, {})
    assert len(prompts) == 4  # 8 training prompts over 2 clients
    first = prompts[0]
    assert first.prompt.startswith("<|im_start|>system") and first.prompt.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{first.question}<|im_end|>" in first.prompt


@pytest.mark.slow
def test_one_round_two_client_pfit_run_on_smollm2(smollm2_cache, tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    from fedllm.apps.client_app import app as client_app
    from fedllm.apps.server_app import make_server_app
    from fedllm.results.writer import read_metrics

    monkeypatch.setenv("FEDLLM_CACHE", str(smollm2_cache))  # Ray's workers inherit it
    cfg = load_config(None, [*SMOL_PFIT, f"output.dir={tmp_path}"])
    done = []
    run_simulation(server_app=make_server_app(cfg, on_done=done.append, echo=lambda line: None),
                   client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    records = read_metrics(done[0])
    assert [r["round"] for r in records] == [0, 1]
    final = records[-1]
    assert final["clients_used"] == 2 and final["rejected"] == []
    # only the shared attention LoRA travels: r (in + out) per projection, 30 layers, float32
    assert final["bytes_up_per_client"] == 4 * 30 * 8 * ((576 + 576) + (576 + 192))
    assert set(final["preference_matrix"]) == {"p0", "p1"} and all(len(r) == 2 for r in final["preference_matrix"].values())
    assert final["client_reward"]["p1"] == pytest.approx(final["preference_matrix"]["p1"][1])
    assert "kl" in final and "score/correct" in final
    samples = [json.loads(line) for line in (done[0] / "samples.jsonl").read_text().splitlines()]
    assert {s["round"] for s in samples} == {0, 1} and all(s["prompt"].endswith("assistant\n") for s in samples)
    assert any(s["completion"].strip() for s in samples)  # the real model answers
