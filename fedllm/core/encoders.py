"""Mean-pooled sentence embeddings, and the embedded MiniLM as a sentence encoder.

Used by the label-embedding classification head (label names embedded by the pretrained
encoder) and by the MiniLM-based rewards of instruction tuning (similarity, tone).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

from fedllm.core.store import embedded_model_dir


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


@torch.no_grad()
def embed_texts(encoder: nn.Module, tokenizer, texts: list[str], max_length: int = 32) -> torch.Tensor:
    encoder.eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = encoder(**enc).last_hidden_state
    return mean_pool(hidden, enc["attention_mask"])


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
