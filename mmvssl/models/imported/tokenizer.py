"""The tokenizer an imported model reads: the source's own (Hugging Face, saved into the folder
with `save_pretrained`), or open_clip's CLIP BPE for open_clip models whose tokenizer it is.

Hugging Face ids come padded to `context_length` with PAD (-1) where the source's tokenizer puts
padding, so the tower knows the attention mask from the ids alone (a CLIP tokenizer pads with its
end token, which a mask read from the ids could not tell apart); the tower swaps PAD for the pad
id. SigLIP was trained on texts padded to its full length without a mask: there padding stays the
pad id (`attention_mask: false` in the folder's config)."""

from __future__ import annotations

import torch

PAD = -1


class HFTextTokenizer:
    """list of N strings -> (N, context_length) int64 ids, truncated to fit."""

    def __init__(self, tokenizer, context_length: int, attention_mask: bool = True):
        self.tokenizer, self.context_length, self.attention_mask = tokenizer, int(context_length), attention_mask
        self.pad_id = PAD if attention_mask else int(tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)

    def encode(self, texts: list[str]) -> dict:
        """The source's own call (what its processor does for text), padded to context_length."""
        return self.tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                              return_tensors="pt")

    def __call__(self, texts: list[str]) -> torch.Tensor:
        enc = self.encode(texts)
        ids = enc["input_ids"].long()
        if self.attention_mask:
            ids = ids.masked_fill(enc["attention_mask"] == 0, PAD)
        return ids


def tokenizer_from_config(text_cfg: dict, hf_tokenizer, context_length: int | None = None):
    length = int(context_length or text_cfg["context_length"])
    if text_cfg.get("tokenizer") == "clip-bpe":
        from ...data.text import ClipBPETokenizer
        return ClipBPETokenizer(length)
    if hf_tokenizer is None:
        raise ValueError("this imported model's tokenizer files are missing (tokenizer/ in its folder)")
    return HFTextTokenizer(hf_tokenizer, length, text_cfg.get("attention_mask", True))
