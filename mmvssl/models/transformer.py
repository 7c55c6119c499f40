"""Pre-norm transformer blocks on `scaled_dot_product_attention` (flash / memory-efficient
kernels on GPU, the fused CPU kernel otherwise), optional gradient checkpointing, and T5's
relative position bias (bucketed signed distances, one learned bias per head, shared by all layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTENTION_IMPLS = ("sdpa", "math")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP models were trained with; a
    tower initialised from their weights needs it to compute what they compute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}' (expected: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """Plain matmul-softmax attention, the reference the SDPA path is benchmarked against. (B, h, N, d)"""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, N, N)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.impl = "sdpa"  # or "math": see set_attention_impl

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C); mask broadcastable to (B, h, N, N): bool (True = attend) or an additive float bias."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        if self.impl == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        else:
            x = _math_attention(q, k, v, mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), activation(act), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets: half the buckets per direction, exact below num_buckets // 4,
    logarithmic up to max_distance, clamped beyond. relative = key - query positions (N, N) -> (N, N)."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    is_small = distance < exact
    log_bucket = exact + (torch.log(distance.float().clamp(min=1) / exact)
                          / math.log(max_distance / exact) * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return bucket + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), added to the attention logits (T5)."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bias = nn.Embedding(num_buckets, heads)
        nn.init.normal_(self.bias.weight, std=0.02)

    def forward(self, n: int) -> torch.Tensor:
        """-> (1, heads, n, n) additive bias."""
        pos = torch.arange(n, device=self.bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.bias(buckets).permute(2, 0, 1)[None]


class Transformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 relative_buckets: int = 0, relative_max_distance: int = 128, act: str = "gelu"):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.relative_bias = (RelativePositionBias(heads, relative_buckets, relative_max_distance)
                              if relative_buckets else None)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """x (B, N, D); key_padding_mask (B, N) True = a real token; `causal`: each token attends
        only to itself and earlier ones (CLIP's text tower) -> (B, N, D)."""
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, N)
        if causal:
            n = x.shape[1]
            tril = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]  # (1, 1, N, N)
            mask = tril if mask is None else mask & tril
        if self.relative_bias is not None:
            bias = self.relative_bias(x.shape[1]).to(x.dtype)  # (1, h, N, N)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.norm(x)


def set_attention_impl(module: nn.Module, impl: str) -> None:
    """Switch every attention layer under `module` to 'sdpa' or the plain 'math' reference."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation '{impl}' (expected: {', '.join(ATTENTION_IMPLS)})")
    for m in module.modules():
        if isinstance(m, Attention):
            m.impl = impl
