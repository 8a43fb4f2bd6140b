"""Device and number format (issue 21's GPU path, the parts a CPU can check): bf16 autocast really runs
the matmuls in bfloat16 while the weights, the loss and the sent delta stay float32; what this machine
cannot run (fp16 without CUDA, a 4/8-bit base without CUDA or bitsandbytes) fails in one line naming
model.precision / model.quantization and the fix; a quantized base accepts only LoRA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedllm.clients import TRAINERS, TrainContext
from fedllm.config import ConfigError, load_config
from fedllm.core.bundle import forward_logits
from fedllm.workloads.classification.data import client_examples, load_suite
from fedllm.workloads.classification.models import build_bundle
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")


def _bundle(*overrides: str):
    cfg = load_config(None, [*TINY_OVERRIDES, *overrides])
    suite = load_suite(cfg.data, cfg.seed)
    return cfg, suite, build_bundle(cfg, suite.label_names)


def _logits(bundle, suite, linear_outputs: list[torch.Tensor]) -> torch.Tensor:
    hooks = [m.register_forward_hook(lambda _m, _i, out: linear_outputs.append(out))
             for m in bundle.model.modules() if isinstance(m, torch.nn.Linear)]
    bundle.model.eval()  # no dropout: both passes compute the same function
    try:
        with torch.no_grad():
            test = suite.split("test")
            return forward_logits(bundle, bundle.model, list(test.texts[:8]), list(test.tasks[:8]),
                                  suite.label_ranges, 32)
    finally:
        for hook in hooks:
            hook.remove()


def test_bf16_autocast_runs_the_matmuls_in_bfloat16_and_keeps_float32_outside():
    _, suite, plain = _bundle()
    _, _, mixed = _bundle("model.precision=bf16")
    plain_outputs, mixed_outputs = [], []
    reference, logits = _logits(plain, suite, plain_outputs), _logits(mixed, suite, mixed_outputs)
    assert {o.dtype for o in plain_outputs} == {torch.float32} and {o.dtype for o in mixed_outputs} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())  # weights stay float32
    assert logits.dtype == torch.float32 and not torch.equal(logits, reference)
    # the last encoder layer's output projection: rounded to bf16 (8 significant bits) on the way, yet
    # the same computation (a different model would not come near)
    last, last_reference = mixed_outputs[-2].float().flatten(), plain_outputs[-2].flatten()
    assert torch.nn.functional.cosine_similarity(last, last_reference, dim=0).item() > 0.99


def test_a_bf16_training_round_sends_a_float32_delta_close_to_the_float32_one():
    deltas = {}
    for precision in ("float32", "bf16"):
        cfg, suite, bundle = _bundle(f"model.precision={precision}", "client.max_steps=5")
        examples = client_examples(cfg.data, 0, 1, cfg.seed)
        before = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if p.requires_grad}
        ctx = TrainContext(section=cfg.client, label_ranges=suite.label_ranges, max_length=32, seed=0)
        result = TRAINERS.get("supervised")(bundle, examples, ctx)
        assert result.loss == result.loss  # not NaN
        deltas[precision] = torch.cat([(p.detach() - before[n]).flatten()
                                       for n, p in bundle.model.named_parameters() if p.requires_grad])
    assert deltas["bf16"].dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(deltas["bf16"], deltas["float32"], dim=0).item()
    assert 0.9 < cosine < 1.0  # the same steps, rounded differently


@no_cuda
@pytest.mark.parametrize(("overrides", "message"), [
    (["model.precision=fp16"], "model.precision 'fp16' needs a CUDA GPU"),
    (["model.quantization=4bit", "peft.method=lora", "peft.global_patterns=[lora_, classifier]"],
     "model.quantization '4bit' needs a CUDA GPU"),
    (["model.quantization=8bit", "peft.method=lora", "peft.global_patterns=[lora_, classifier]"],
     "set model.quantization: none"),
])
def test_what_a_cpu_cannot_run_is_one_clear_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _bundle(*overrides)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.quantization=4bit", "peft.method=full"], "peft.method 'full' would train it; use peft.method: lora"),
    (["model.quantization=4bit", "peft.method=lora", "peft.fuse_lora_as=weight_delta"],
     "fuse_lora_as 'weight_delta' folds"),
    (["model.quantization=2bit"], "model.quantization"),
])
def test_a_quantized_base_takes_lora_only(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@no_cuda
def test_gpu_check_says_it_needs_cuda_and_exits_0_on_a_cpu_machine():
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "needs a CUDA GPU" in run.stdout
