"""Pooled sentence embeddings (mean for encoders, last token for decoders), and the embedded
MiniLM as a sentence encoder.

Used by the label-embedding classification head (label names embedded by the pretrained
encoder) and by the MiniLM-based rewards of instruction tuning (similarity, tone).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import nn

from fedllm.core.store import embedded_model_dir


Pooling = Literal["mean", "last"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The state of each row's last non-pad token, with padding on either side. A causal decoder's
    mean-pooled states are dominated by the few huge activations every token shares, so sentences
    (and label names) all look alike to cosine similarity; its last state has read the whole text."""
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(1).to(torch.long).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: Pooling = "mean") -> torch.Tensor:
    return last_token_pool(hidden, attention_mask) if how == "last" else mean_pool(hidden, attention_mask)


def decoder_only(config: Any) -> bool:
    """Is this a decoder-only (causal) architecture? transformers lists it among causal LMs and not
    among masked LMs (BERT and RoBERTa are in both: they also have causal-LM heads)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


@torch.no_grad()
def embed_texts(encoder: nn.Module, tokenizer, texts: list[str], max_length: int = 32,
                pooling: Pooling = "mean") -> torch.Tensor:
    encoder.eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = encoder(**enc).last_hidden_state
    return pool(hidden, enc["attention_mask"], pooling)


@lru_cache(maxsize=1)
def _sentence_encoder():
    from transformers import AutoModel, AutoTokenizer

    path = str(embedded_model_dir())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str]) -> torch.Tensor:
    """Unit-norm MiniLM sentence embeddings (mean pooled), as sentence-transformers computes them."""
    encoder, tokenizer = _sentence_encoder()
    emb = embed_texts(encoder, tokenizer, [t if t.strip() else "." for t in texts], max_length=64)
    return torch.nn.functional.normalize(emb, dim=-1)
