"""A tiny model with the MultimodalModel interface (batch dict -> named, normalised embeddings),
small enough for exact-gradient tests across processes; no BatchNorm, so its per-sample
outputs do not depend on how the batch is split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TERMS = [
    {"name": "va_nce", "loss": "nce", "inputs": ["video_va", "audio_va"], "weight": 1.0},
    {"name": "va_ntxent", "loss": "nt_xent", "inputs": ["video_va", "audio_va"], "weight": 0.5},
    {"name": "va_siglip", "loss": "siglip", "inputs": ["video_va", "audio_va"], "weight": 0.3, "temperature": 0.1},
    {"name": "vt_milnce", "loss": "mil_nce", "inputs": ["video_vat", "text_vat"], "weight": 1.0},
]


class TinyModel(nn.Module):
    def __init__(self, dim: int = 6, vocab: int = 50):
        super().__init__()
        self.video = nn.Linear(12, dim)
        self.audio = nn.Linear(10, dim)
        self.va_to_vat = nn.Linear(dim, dim)
        self.token_embed = nn.Embedding(vocab, dim)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        va = self.video(batch["video"])  # (B, D)
        text = self.token_embed(batch["text"]).mean(dim=2)  # (B, K, D)
        return {"video_va": F.normalize(va, dim=-1), "audio_va": F.normalize(self.audio(batch["audio"]), dim=-1),
                "video_vat": F.normalize(self.va_to_vat(va), dim=-1), "text_vat": F.normalize(text, dim=-1)}


def make_batch(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    has_audio = torch.ones(n, dtype=torch.bool)
    has_audio[1] = has_audio[n - 2] = False  # one missing on each half
    text_mask = torch.ones(n, 2, dtype=torch.bool)
    text_mask[::3, 1] = False  # some clips have one candidate only
    return {"video": torch.randn(n, 12, generator=g), "audio": torch.randn(n, 10, generator=g),
            "text": torch.randint(0, 50, (n, 2, 5), generator=g), "text_mask": text_mask,
            "has_video": torch.ones(n, dtype=torch.bool), "has_audio": has_audio,
            "has_text": torch.ones(n, dtype=torch.bool)}


def build(seed: int = 0):
    """The same model and objective (learnable temperatures) in every process."""
    from mmvssl.losses.objective import Objective
    torch.manual_seed(seed)
    return TinyModel(), Objective(TERMS, temperature=0.07, learnable_temperature=True)


def gradients(model: nn.Module, objective: nn.Module) -> dict[str, torch.Tensor]:
    named = [*(("model." + n, p) for n, p in model.named_parameters()),
             *(("objective." + n, p) for n, p in objective.named_parameters())]
    return {n: p.grad.detach().clone() for n, p in named}
