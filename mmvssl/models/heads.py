"""Projection heads into the shared embedding spaces.

MMV's fine-and-coarse (FAC) design: video and audio meet in a fine space `va`; text meets video
in a coarser space `vat` reached from the video's `va` embedding, so audio reaches `vat` through
the same va->vat head at evaluation. Dimensions are 512 (va) and 256 (vat) in MMV.
"""

from __future__ import annotations

import torch
from torch import nn


class FACHeads(nn.Module):
    def __init__(self, video_width: int, audio_width: int, text_width: int,
                 va_dim: int = 512, vat_dim: int = 256):
        super().__init__()
        self.video_to_va = nn.Sequential(  # Linear-BN-ReLU-Linear-BN
            nn.Linear(video_width, va_dim), nn.BatchNorm1d(va_dim), nn.ReLU(inplace=True),
            nn.Linear(va_dim, va_dim), nn.BatchNorm1d(va_dim))
        self.audio_to_va = nn.Linear(audio_width, va_dim)
        self.va_to_vat = nn.Sequential(nn.ReLU(), nn.Linear(va_dim, vat_dim), nn.BatchNorm1d(vat_dim))
        self.text_to_vat = nn.Linear(text_width, vat_dim)

    def project(self, modality: str, pooled: torch.Tensor, space: str) -> torch.Tensor:
        """(N, width) encoder output -> (N, dim) embedding in `space` ('va' or 'vat'), unnormalised."""
        if modality == "text":
            if space != "vat":
                raise ValueError(f"text embeds only in space 'vat', not '{space}'")
            return self.text_to_vat(pooled)
        if modality not in ("video", "audio"):
            raise ValueError(f"unknown modality '{modality}'")
        va = self.video_to_va(pooled) if modality == "video" else self.audio_to_va(pooled)
        if space == "va":
            return va
        if space == "vat":
            return self.va_to_vat(va)
        raise ValueError(f"unknown space '{space}' (FAC heads have 'va' and 'vat')")
