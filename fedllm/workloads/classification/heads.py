"""A frozen classification head made of label-name embeddings (CLIP-style zero-shot heads).

R-MTLLMF merges encoders fine-tuned on different tasks; a trained linear head per task would be
merged too (or kept aside) and muddy the comparison. As CLIP's zero-shot text heads do for the
paper's ViT, this head scores a sentence by the cosine similarity of its pooled embedding (mean, or
a decoder's last token) to each label name's embedding (from the *pretrained* encoder, fixed), over
a temperature. Only the encoder trains and travels, and the pretrained model already has a
zero-shot accuracy.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from fedllm.core.encoders import Pooling, pool


class LabelEmbeddingClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, label_embeddings: torch.Tensor, temperature: float,
                 pooling: Pooling = "mean") -> None:
        super().__init__()
        self.pooling = pooling
        self.encoder = encoder
        self.register_buffer("label_embeddings", F.normalize(label_embeddings, dim=-1))
        self.temperature = temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: torch.Tensor) -> SimpleNamespace:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        sentence = F.normalize(pool(hidden, attention_mask, self.pooling), dim=-1)
        return SimpleNamespace(logits=sentence @ self.label_embeddings.T / self.temperature)
