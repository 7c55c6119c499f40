"""VATT-style modality encoders: tokenise, add positions, prepend an aggregation token, transform.

Every encoder returns {"pooled": (B, D), "tokens": (B, N, D)}: the aggregation token's output and
the output of the other tokens (the narrator uses the tokens), and has a `.width` (D). The video
transformer adds "frames" (B, t, D), its tokens averaged over h x w per temporal position (the
student side of per-frame distillation; DropToken-aware).

Modality-agnostic models (VATT-MA) pass one `shared` Transformer to every encoder: each encoder
then keeps its own tokeniser, positions and aggregation token, plus an input projection
(Linear + GELU before the backbone) and an output projection (Linear + GELU after it), as in
VATT's universal transformer. The shared backbone is owned (registered) by the model, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Transformer


def _keep_index(x: torch.Tensor, rate: float) -> torch.Tensor:
    """DropToken (VATT): the indices of a random subset of (1 - rate) of the tokens of each sample."""
    B, N, D = x.shape
    keep = max(1, int(round(N * (1.0 - rate))))
    return torch.rand(B, N, device=x.device).argsort(dim=1)[:, :keep]  # (B, keep)


def _drop_tokens(x: torch.Tensor, rate: float) -> torch.Tensor:
    """DropToken (VATT): keep a random subset of (1 - rate) of the tokens of each sample. (B, N, D)"""
    idx = _keep_index(x, rate)
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[2]))


def _frame_means(tokens: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
    """tokens (B, N, D) with their temporal position (B, N) in [0, t) -> (B, t, D), the mean of the
    tokens at each temporal position (zero where DropToken left none)."""
    B, N, D = tokens.shape
    sums = tokens.new_zeros(B, t, D).scatter_add(1, position[..., None].expand(B, N, D), tokens)
    counts = torch.zeros(B, t, device=tokens.device, dtype=tokens.dtype).scatter_add(
        1, position, torch.ones_like(position, dtype=tokens.dtype))
    return sums / counts.clamp(min=1)[..., None]


def _resize_positions(pos: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation of a (1, L, D) table to (1, n, D), for inputs of another length."""
    if pos.shape[1] == n:
        return pos
    return F.interpolate(pos.transpose(1, 2), size=n, mode="linear", align_corners=False).transpose(1, 2)


class TokenEncoder(nn.Module):
    """The part every transformer encoder shares: [agg] + tokens -> (shared or own) transformer."""

    def _init_backbone(self, width: int, depth: int, heads: int, mlp_ratio: float,
                       shared: Transformer | None, act: str = "gelu", **transformer_kwargs) -> None:
        self.width = width
        self.agg_token = nn.Parameter(torch.zeros(1, 1, width))
        if shared is None:
            self.transformer = Transformer(width, depth, heads, mlp_ratio, act=act, **transformer_kwargs)
            self.in_proj = self.out_proj = None
        else:  # not registered here: the model owns the one shared backbone
            object.__setattr__(self, "transformer", shared)
            self.in_proj = nn.Sequential(nn.Linear(width, width), nn.GELU())
            self.out_proj = nn.Sequential(nn.Linear(width, width), nn.GELU())

    def _transform(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x (B, N, D) positioned tokens -> {"pooled": (B, D), "tokens": (B, N, D)}."""
        x = torch.cat([self.agg_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = self.transformer(x, key_padding_mask=keep)
        if self.out_proj is not None:
            x = self.out_proj(x)
        return {"pooled": x[:, 0], "tokens": x[:, 1:]}


class ConvStem(nn.Module):
    """A convolutional stem in place of the linear patch embedding (Xiao et al. 2021, "Early
    convolutions help transformers see better"): log2(p) 3x3 convolutions of stride 2 on every
    frame, each with BatchNorm and ReLU, channels doubling from max(16, width / 8) up to `width`. (B, C, T, H, W)
    -> (B, channels, T, H / p, W / p); the tubelet's temporal merge and the projection to the
    encoder's width follow as `patch_embed` (kernel t x 1 x 1). Small ViTs trained from scratch on
    little data see shape far better through it. Frames go through Conv2d, much faster on CPU than
    the equivalent 1 x 3 x 3 Conv3d."""

    def __init__(self, in_channels: int, patch: tuple[int, int, int], width: int):
        super().__init__()
        _, ph, pw = patch
        if ph != pw or ph < 2 or ph & (ph - 1):
            raise ValueError(f"stem 'conv' needs a square power-of-two spatial patch, got {list(patch)}")
        layers, channels, base = [], in_channels, max(16, width // 8)
        for i in range(ph.bit_length() - 1):
            out = min(width, base * 2 ** i)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        self.layers, self.channels = nn.Sequential(*layers), channels

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = video.shape
        x = self.layers(video.transpose(1, 2).reshape(B * T, C, H, W))  # every frame alike
        return x.reshape(B, T, *x.shape[1:]).transpose(1, 2)  # (B, channels, T, h, w)


class VideoEncoder(TokenEncoder):
    """Tubelet embedding (Conv3d, kernel = stride = t x p x p) + factorised time/height/width positions.
    `stem: conv` puts a convolutional stem before a t x 1 x 1 tubelet projection instead."""

    def __init__(self, width: int, depth: int, heads: int, patch: tuple[int, int, int] = (4, 16, 16),
                 num_frames: int = 32, image_size: int = 224, mlp_ratio: float = 4.0,
                 drop_token: float = 0.0, in_channels: int = 3, stem: str = "patch", act: str = "gelu",
                 shared: Transformer | None = None):
        super().__init__()
        self.patch = tuple(patch)
        self.drop_token = drop_token
        self.num_frames, self.image_size = num_frames, image_size
        self.in_channels = in_channels
        t, p = num_frames // self.patch[0], image_size // self.patch[1]
        if stem == "patch":
            self.stem = None
            self.patch_embed = nn.Conv3d(in_channels, width, kernel_size=self.patch, stride=self.patch)
        elif stem == "conv":
            self.stem = ConvStem(in_channels, self.patch, width)
            kernel = (self.patch[0], 1, 1)
            self.patch_embed = nn.Conv3d(self.stem.channels, width, kernel_size=kernel, stride=kernel)
        else:
            raise ValueError(f"unknown stem '{stem}' (expected: patch, conv)")
        self.pos_t = nn.Parameter(torch.randn(1, t, width) * 0.02)
        self.pos_h = nn.Parameter(torch.randn(1, p, width) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(1, image_size // self.patch[2], width) * 0.02)
        self._init_backbone(width, depth, heads, mlp_ratio, shared, act)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        if video.ndim != 5 or video.shape[1] != self.in_channels:
            raise ValueError(f"video encoder expects (B, {self.in_channels}, T, H, W), got {tuple(video.shape)}")
        T, H, W = video.shape[2:]
        if T % self.patch[0] or H % self.patch[1] or W % self.patch[2]:
            raise ValueError(f"video of T x H x W = {T}x{H}x{W} is not divisible by the tubelet {self.patch}")
        x = self.patch_embed(video if self.stem is None else self.stem(video))  # (B, D, t, h, w)
        B, D, t, h, w = x.shape
        x = x.permute(0, 2, 3, 4, 1)  # (B, t, h, w, D)
        if self.in_proj is not None:
            x = self.in_proj(x)
        pos = (_resize_positions(self.pos_t, t)[:, :, None, None]
               + _resize_positions(self.pos_h, h)[:, None, :, None]
               + _resize_positions(self.pos_w, w)[:, None, None, :])  # (1, t, h, w, D)
        x = (x + pos).reshape(B, t * h * w, D)
        position = torch.arange(t, device=x.device).repeat_interleave(h * w).expand(B, -1)  # (B, N) time index
        if self.training and self.drop_token > 0:
            idx = _keep_index(x, self.drop_token)  # (B, keep)
            x, position = x.gather(1, idx[..., None].expand(*idx.shape, D)), position.gather(1, idx)
        out = self._transform(x)
        out["frames"] = _frame_means(out["tokens"], position, t)  # (B, t, D): mean over h, w per position
        return out

    def forward_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Deflation for transformers: (B, C, H, W) stills -> the output of the static clip that
        repeats each image over the `num_frames` the encoder was built for."""
        if images.ndim != 4:
            raise ValueError(f"image encoder expects (B, {self.in_channels}, H, W), got {tuple(images.shape)}")
        return self(images[:, :, None].expand(-1, -1, self.num_frames, -1, -1))  # (B, C, T, H, W)


class AudioEncoder(TokenEncoder):
    """Raw waveform patches (Conv1d, kernel = stride = patch samples) + learnable 1-D positions."""

    def __init__(self, width: int, depth: int, heads: int, patch: int = 128, num_samples: int = 153600,
                 mlp_ratio: float = 4.0, drop_token: float = 0.0, shared: Transformer | None = None):
        super().__init__()
        self.patch = patch
        self.drop_token = drop_token
        self.patch_embed = nn.Conv1d(1, width, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, num_samples // patch, width) * 0.02)
        self._init_backbone(width, depth, heads, mlp_ratio, shared)

    def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        if audio.ndim != 2 or audio.shape[1] < self.patch:
            raise ValueError(f"audio encoder expects a waveform (B, S) with S >= {self.patch}, "
                             f"got {tuple(audio.shape)}")
        x = self.patch_embed(audio[:, None, :]).transpose(1, 2)  # (B, N, D)
        if self.in_proj is not None:
            x = self.in_proj(x)
        x = x + _resize_positions(self.pos, x.shape[1])
        if self.training and self.drop_token > 0:
            x = _drop_tokens(x, self.drop_token)
        return self._transform(x)


class TextEncoder(TokenEncoder):
    """Token embeddings (open_clip BPE vocabulary by default, or a sentencepiece vocabulary's
    size) + positions, bidirectional attention that ignores padding, an aggregation token.
    Padding is the run of `pad_id` tokens after the last other token (open_clip pads with id 0,
    which is also the token '!', so a '!' inside the text stays a token).
    `relative_buckets > 0` makes it T5-style (VATT's text transformer): no absolute positions, a
    bucketed relative position bias in the attention instead.
    `causal: true` makes it CLIP's text tower: causal attention, no aggregation token, the output
    of the last real token (CLIP's end-of-text token) pooled; with the weights copied from an
    open_clip model (`model.init_towers: [video, text]`) it computes open_clip's encode_text."""

    def __init__(self, width: int, depth: int, heads: int, vocab_size: int = 49408,
                 context_length: int = 77, mlp_ratio: float = 4.0, pad_id: int = 0,
                 relative_buckets: int = 0, relative_max_distance: int = 128, causal: bool = False,
                 act: str = "gelu", shared: Transformer | None = None):
        super().__init__()
        self.pad_id = pad_id
        self.causal = bool(causal)
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if relative_buckets:
            if shared is not None:
                raise ValueError("a relative position bias cannot live in a shared (modality-agnostic) backbone")
            self.pos = None
            rel = {"relative_buckets": relative_buckets, "relative_max_distance": relative_max_distance}
        else:
            self.pos = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
            rel = {}
        self._init_backbone(width, depth, heads, mlp_ratio, shared, act, **rel)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text encoder expects token ids (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"text of {tokens.shape[1]} tokens exceeds the context length {self.context_length}")
        B, L = tokens.shape
        x = self.token_embed(tokens)  # (B, L, D)
        if self.in_proj is not None:
            x = self.in_proj(x)
        if self.pos is not None:
            x = x + self.pos[:, :L]
        real = tokens != self.pad_id
        length = torch.where(real.any(dim=1), L - real.flip(1).int().argmax(dim=1), 0)  # up to the last real token
        keep = torch.arange(L, device=tokens.device)[None] < length[:, None]  # (B, L)
        if self.causal:
            keep[:, 0] = True  # an empty text still has one token to pool (and no all-masked row)
            x = self.transformer(x, key_padding_mask=keep, causal=True)
            if self.out_proj is not None:
                x = self.out_proj(x)
            last = (length - 1).clamp(min=0)
            return {"pooled": x[torch.arange(B, device=x.device), last], "tokens": x}
        keep = torch.cat([tokens.new_ones(B, 1, dtype=torch.bool), keep], dim=1)  # (B, 1 + L): agg token first
        return self._transform(x, keep)
