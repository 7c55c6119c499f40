"""VATT-style modality encoders: tokenise, add positions, prepend an aggregation token, transform.

Every encoder returns {"pooled": (B, D), "tokens": (B, N, D)}: the aggregation token's output and
the output of the other tokens (the narrator and per-frame distillation use the tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Transformer


def _drop_tokens(x: torch.Tensor, rate: float) -> torch.Tensor:
    """DropToken (VATT): keep a random subset of (1 - rate) of the tokens of each sample. (B, N, D)"""
    B, N, D = x.shape
    keep = max(1, int(round(N * (1.0 - rate))))
    idx = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :keep]  # (B, keep)
    return x.gather(1, idx[..., None].expand(B, keep, D))


def _resize_positions(pos: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation of a (1, L, D) table to (1, n, D), for inputs of another length."""
    if pos.shape[1] == n:
        return pos
    return F.interpolate(pos.transpose(1, 2), size=n, mode="linear", align_corners=False).transpose(1, 2)


class VideoEncoder(nn.Module):
    """Tubelet embedding (Conv3d, kernel = stride = t x p x p) + factorised time/height/width positions."""

    def __init__(self, width: int, depth: int, heads: int, patch: tuple[int, int, int] = (4, 16, 16),
                 num_frames: int = 32, image_size: int = 224, mlp_ratio: float = 4.0,
                 drop_token: float = 0.0, in_channels: int = 3):
        super().__init__()
        self.patch = tuple(patch)
        self.drop_token = drop_token
        self.width = width
        t, p = num_frames // self.patch[0], image_size // self.patch[1]
        self.patch_embed = nn.Conv3d(in_channels, width, kernel_size=self.patch, stride=self.patch)
        self.pos_t = nn.Parameter(torch.randn(1, t, width) * 0.02)
        self.pos_h = nn.Parameter(torch.randn(1, p, width) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(1, image_size // self.patch[2], width) * 0.02)
        self.agg_token = nn.Parameter(torch.zeros(1, 1, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        if video.ndim != 5 or video.shape[1] != self.patch_embed.in_channels:
            raise ValueError(f"video encoder expects (B, {self.patch_embed.in_channels}, T, H, W), "
                             f"got {tuple(video.shape)}")
        T, H, W = video.shape[2:]
        if T % self.patch[0] or H % self.patch[1] or W % self.patch[2]:
            raise ValueError(f"video of T x H x W = {T}x{H}x{W} is not divisible by the tubelet {self.patch}")
        x = self.patch_embed(video)  # (B, D, t, h, w)
        B, D, t, h, w = x.shape
        pos = (_resize_positions(self.pos_t, t)[:, :, None, None]
               + _resize_positions(self.pos_h, h)[:, None, :, None]
               + _resize_positions(self.pos_w, w)[:, None, None, :])  # (1, t, h, w, D)
        x = x.permute(0, 2, 3, 4, 1) + pos  # (B, t, h, w, D)
        x = x.reshape(B, t * h * w, D)
        if self.training and self.drop_token > 0:
            x = _drop_tokens(x, self.drop_token)
        x = torch.cat([self.agg_token.expand(B, -1, -1), x], dim=1)
        x = self.transformer(x)
        return {"pooled": x[:, 0], "tokens": x[:, 1:]}


class AudioEncoder(nn.Module):
    """Raw waveform patches (Conv1d, kernel = stride = patch samples) + learnable 1-D positions."""

    def __init__(self, width: int, depth: int, heads: int, patch: int = 128, num_samples: int = 153600,
                 mlp_ratio: float = 4.0, drop_token: float = 0.0):
        super().__init__()
        self.patch = patch
        self.drop_token = drop_token
        self.width = width
        self.patch_embed = nn.Conv1d(1, width, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, num_samples // patch, width) * 0.02)
        self.agg_token = nn.Parameter(torch.zeros(1, 1, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio)

    def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        if audio.ndim != 2 or audio.shape[1] < self.patch:
            raise ValueError(f"audio encoder expects a waveform (B, S) with S >= {self.patch}, "
                             f"got {tuple(audio.shape)}")
        x = self.patch_embed(audio[:, None, :]).transpose(1, 2)  # (B, N, D)
        x = x + _resize_positions(self.pos, x.shape[1])
        if self.training and self.drop_token > 0:
            x = _drop_tokens(x, self.drop_token)
        x = torch.cat([self.agg_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.transformer(x)
        return {"pooled": x[:, 0], "tokens": x[:, 1:]}


class TextEncoder(nn.Module):
    """Token embeddings (open_clip BPE vocabulary by default) + positions, bidirectional
    attention that ignores padding (id `pad_id`), an aggregation token."""

    def __init__(self, width: int, depth: int, heads: int, vocab_size: int = 49408,
                 context_length: int = 77, mlp_ratio: float = 4.0, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.width = width
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.agg_token = nn.Parameter(torch.zeros(1, 1, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text encoder expects token ids (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.pos.shape[1]:
            raise ValueError(f"text of {tokens.shape[1]} tokens exceeds the context length {self.pos.shape[1]}")
        B, L = tokens.shape
        x = self.token_embed(tokens) + self.pos[:, :L]  # (B, L, D)
        x = torch.cat([self.agg_token.expand(B, -1, -1), x], dim=1)
        keep = torch.cat([tokens.new_ones(B, 1, dtype=torch.bool), tokens != self.pad_id], dim=1)
        x = self.transformer(x, key_padding_mask=keep)
        return {"pooled": x[:, 0], "tokens": x[:, 1:]}
