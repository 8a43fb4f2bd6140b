"""PEFT set-up shared by every workload: LoRA from PEFT, bottleneck adapters, what trains.

``peft.method`` picks LoRA (PEFT's, on ``target_modules``), full fine-tuning or a frozen base;
adapters wrap ``adapter_targets``; ``frozen_patterns`` are never trained (hence never sent).
"""

from __future__ import annotations

import torch

from fedllm.config import ExperimentConfig
from fedllm.core.vectors import matches
from fedllm.workloads.adapters import add_adapters


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
        try:
            model = get_peft_model(model, lora)  # freezes all but LoRA and the head
        except ValueError as exc:
            raise ValueError(f"peft.target_modules {cfg.peft.target_modules}: {exc}") from None
    elif cfg.peft.method == "none":
        for name, param in model.named_parameters():
            param.requires_grad_("classifier" in name)
    for name, param in model.named_parameters():
        if "adapter_down" in name or "adapter_up" in name:
            param.requires_grad_(True)
        if matches(name, cfg.peft.frozen_patterns):
            param.requires_grad_(False)
    return model
