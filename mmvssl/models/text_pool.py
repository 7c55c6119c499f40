"""MMV's light text encoder: word embeddings -> Linear -> ReLU -> max-pool over the words.

MMV embeds narrations with (frozen) word2vec, 300-d, then a linear layer to 2048, a ReLU and a
max over the words; the result meets the video in the `vat` space through the text head.
"""

from __future__ import annotations

import torch
from torch import nn


class WordPoolTextEncoder(nn.Module):
    """(B, L) token ids -> {"pooled": (B, width) max over real tokens, "tokens": (B, L, width)}."""

    def __init__(self, width: int = 2048, vocab_size: int = 49408, embed_dim: int = 300,
                 context_length: int = 77, pad_id: int = 0, freeze_embeddings: bool = False):
        super().__init__()
        self.width, self.pad_id, self.context_length = width, pad_id, context_length
        self.token_embed = nn.Embedding(vocab_size, embed_dim)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.token_embed.weight.requires_grad_(not freeze_embeddings)
        self.proj = nn.Linear(embed_dim, width)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text encoder expects token ids (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"text of {tokens.shape[1]} tokens exceeds the context length {self.context_length}")
        x = torch.relu(self.proj(self.token_embed(tokens)))  # (B, L, width)
        real = tokens != self.pad_id  # (B, L)
        # an all-padding text pools to zeros instead of -inf
        pooled = x.masked_fill(~real[..., None], float("-inf")).amax(dim=1)  # (B, width)
        pooled = torch.where(real.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
        return {"pooled": pooled, "tokens": x}
