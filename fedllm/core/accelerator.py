"""Where a model runs and in which number format: CUDA when present, mixed precision, k-bit bases.

Why one module: the classifier, the causal-LM policy and both trainers must agree on the device and
the precision, and a config asking for what the machine cannot do (4-bit without CUDA, fp16 on a
CPU) must fail in one clear line where the model is built (the server, before anything starts), not
deep inside a library. On a Ray cluster each client actor sees only the GPUs Ray assigned to it
(``CUDA_VISIBLE_DEVICES``), so ``cuda`` is that GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch

from fedllm.core.errors import ConfigError

GPU_EXTRA = "pip install -e '.[gpu]'"  # bitsandbytes


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("model.precision 'fp16' needs a CUDA GPU (CPU autocast supports bfloat16 only); "
                          "set model.precision: bf16 or float32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: matmuls in bf16/fp16, weights and optimiser state stay
    float32 (so the deltas sent are float32 whatever the precision)."""
    if precision == "float32":
        return contextlib.nullcontext()
    check_precision(precision, device)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def quantized_loading(quantization: str, precision: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for a k-bit base (QLoRA: NF4 4-bit, or LLM.int8 8-bit); empty for
    ``none``. Raises a config error on a machine that cannot run it."""
    if quantization == "none":
        return {}
    if not torch.cuda.is_available():
        raise ConfigError(f"model.quantization {quantization!r} needs a CUDA GPU (bitsandbytes k-bit kernels); "
                          "this machine has none: set model.quantization: none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization {quantization!r} needs the bitsandbytes package: {GPU_EXTRA}, "
                          "or set model.quantization: none")
    from transformers import BitsAndBytesConfig

    compute = torch.float16 if precision == "fp16" else torch.bfloat16
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute) if quantization == "4bit"
              else BitsAndBytesConfig(load_in_8bit=True))
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def prepare_quantized(model: torch.nn.Module, quantization: str) -> torch.nn.Module:
    """PEFT's preparation of a k-bit base for training (casts norms to float32, enables input grads)."""
    if quantization == "none":
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
