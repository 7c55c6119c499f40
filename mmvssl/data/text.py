"""Tokenizers. The default is open_clip's BPE (its vocabulary ships inside the wheel, so it
works offline); Hugging Face and sentencepiece tokenizers plug in behind the same call."""

from __future__ import annotations

import torch


class ClipBPETokenizer:
    """open_clip's SimpleTokenizer: lower-cased BPE, <start> ... <end>, zero padding."""

    pad_id = 0

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)
        self.vocab_size = self._tok.vocab_size

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """list of N strings -> (N, context_length) int64 ids, truncated to fit."""
        return self._tok(list(texts), context_length=self.context_length)


def build_tokenizer(name: str = "clip-bpe", context_length: int = 77):
    if name == "clip-bpe":
        return ClipBPETokenizer(context_length)
    raise ValueError(f"unknown tokenizer '{name}' (available: clip-bpe)")


def tokenizer_for(model, context_length: int):
    """The tokenizer `model` reads: its own when it carries one (an imported model's source tokenizer,
    mmvssl/models/imported/tokenizer.py), else open_clip's BPE."""
    own = getattr(model, "text_tokenizer", None)
    return own(context_length) if own is not None else build_tokenizer("clip-bpe", context_length)
