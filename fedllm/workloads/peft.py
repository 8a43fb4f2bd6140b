"""PEFT set-up shared by every workload: LoRA from PEFT, bottleneck adapters, what trains.

``peft.method`` picks LoRA (PEFT's, on ``target_modules``), full fine-tuning or a frozen base;
adapters wrap ``adapter_targets``; ``frozen_patterns`` are never trained (hence never sent).
"""

from __future__ import annotations

import torch

from fedllm.config import ExperimentConfig
from fedllm.core.errors import ConfigError
from fedllm.core.vectors import matches
from fedllm.workloads.adapters import add_adapters, linear_layer_names, linear_layers, model_type

HEADS = ("classifier", "score")  # the classification head: BERT's `classifier`, a decoder's `score`


def is_head(name: str) -> bool:
    return any(part in HEADS for part in name.split("."))


def wrap_peft(model: torch.nn.Module, cfg: ExperimentConfig, seed: int, causal_lm: bool = False) -> torch.nn.Module:
    """Add adapters and/or LoRA and set what trains: by ``peft.method``, minus ``frozen_patterns``."""
    torch.manual_seed(seed + 1)
    if cfg.peft.adapter_size:
        add_adapters(model, cfg.peft.adapter_targets, cfg.peft.adapter_size)
    if cfg.peft.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=(TaskType.CAUSAL_LM if causal_lm else TaskType.SEQ_CLS if cfg.model.head == "linear" else None),
            r=cfg.peft.r,
            lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout, target_modules=list(cfg.peft.target_modules),
        )
        if not any(matches(name, cfg.peft.target_modules) for name in linear_layers(model)):
            raise ConfigError(f"peft.target_modules {cfg.peft.target_modules} match no linear layer of this "
                             f"{model_type(model)!r} model; its linear layers: {', '.join(linear_layer_names(model))}")
        try:
            model = get_peft_model(model, lora)  # freezes all but LoRA and the head
        except ValueError as exc:
            raise ConfigError(f"peft.target_modules {cfg.peft.target_modules}: {exc}") from None
    elif cfg.peft.method == "none":
        for name, param in model.named_parameters():
            param.requires_grad_(is_head(name))
    for name, param in model.named_parameters():
        if "adapter_down" in name or "adapter_up" in name:
            param.requires_grad_(True)
        if cfg.peft.freeze_lora_a and ".lora_A." in name:  # FFA-LoRA: only B trains (and is sent)
            param.requires_grad_(False)
        if matches(name, cfg.peft.frozen_patterns):
            param.requires_grad_(False)
    return model
