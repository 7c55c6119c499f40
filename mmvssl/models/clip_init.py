"""CLIP initialisation of the video transformer from an open_clip ViT (as LaViLa starts from CLIP).

The 2-D patch embedding is inflated to tubelets (the kernel repeated over the tubelet's t frames
and divided by t, so a static clip gives the image's patch features), the blocks map one to one
(ln_1 / attn.in_proj / attn.out_proj / ln_2 / mlp.c_fc / mlp.c_proj -> norm1 / attn.qkv /
attn.proj / norm2 / mlp.0 / mlp.2, same q, k, v layout), ln_post becomes the final norm and the
class token the aggregation token. CLIP's joint 2-D position table is factorised into mmvssl's
height and width tables (row means and centred column means, interpolated to the encoder's
grid); the temporal table keeps its initialisation. CLIP's ln_pre has no counterpart, and
OpenAI models use QuickGELU where mmvssl uses GELU: this is a starting point, not an exact copy.

`model.init_arch` / `model.init_pretrained` in the config apply it when the engine builds the
model (default off).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

BLOCK_MAP = {"ln_1": "norm1", "attn.in_proj_": "attn.qkv.", "attn.out_proj": "attn.proj", "ln_2": "norm2",
             "mlp.c_fc": "mlp.0", "mlp.c_proj": "mlp.2"}


def _factorise_positions(pos: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid * grid, D) joint table -> (1, grid, D) rows and (1, grid, D) columns whose sums
    approximate it (row means + column means - overall mean)."""
    table = pos.view(grid, grid, -1)  # (h, w, D)
    rows, cols = table.mean(dim=1), table.mean(dim=0) - table.mean(dim=(0, 1))
    return rows[None], cols[None]


@torch.no_grad()
def inflate_clip_into_video_encoder(encoder: nn.Module, visual: nn.Module) -> list[str]:
    """Copy an open_clip VisionTransformer into a mmvssl VideoEncoder; returns the names set."""
    from .encoders import _resize_positions
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise ConfigError(f"model.init_arch: CLIP initialisation needs an open_clip ViT image tower, "
                          f"got {type(visual).__name__}")
    if getattr(encoder, "in_proj", None) is not None or not hasattr(encoder, "patch_embed"):
        raise ConfigError("model.init_arch: CLIP initialisation needs a video transformer with its own blocks")
    width = visual.conv1.weight.shape[0]
    blocks = list(visual.transformer.resblocks)
    if encoder.width != width or len(encoder.transformer.blocks) != len(blocks):
        raise ConfigError(f"model.init_arch: the CLIP ViT has width {width} and {len(blocks)} blocks, the video "
                          f"encoder width {encoder.width} and {len(encoder.transformer.blocks)} blocks: set "
                          f"video.width / video.depth in the preset to match")
    t, p, q = encoder.patch
    kernel = visual.conv1.weight  # (D, 3, P, P)
    if kernel.shape[-2:] != (p, q):
        kernel = nn.functional.interpolate(kernel, size=(p, q), mode="bicubic", align_corners=False)
    encoder.patch_embed.weight.copy_(kernel[:, :, None].repeat(1, 1, t, 1, 1) / t)  # (D, 3, t, p, q)
    if encoder.patch_embed.bias is not None:
        encoder.patch_embed.bias.zero_()
    done = ["patch_embed"]
    pos = visual.positional_embedding  # (1 + g * g, D)
    encoder.agg_token.copy_((visual.class_embedding + pos[0]).view(1, 1, -1))
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    rows, cols = _factorise_positions(pos[1:], grid)
    encoder.pos_h.copy_(_resize_positions(rows, encoder.pos_h.shape[1]))
    encoder.pos_w.copy_(_resize_positions(cols, encoder.pos_w.shape[1]))
    done += ["agg_token", "pos_h", "pos_w"]
    for i, (src, dst) in enumerate(zip(blocks, encoder.transformer.blocks)):
        target = dict(dst.named_parameters())
        for name, value in src.named_parameters():
            mapped = next((name.replace(a, b, 1) for a, b in BLOCK_MAP.items() if name.startswith(a)), None)
            if mapped not in target or target[mapped].shape != value.shape:
                raise ConfigError(f"model.init_arch: CLIP block {i} parameter '{name}' has no counterpart "
                                  f"of shape {tuple(value.shape)} in the video encoder")
            target[mapped].copy_(value)
        done.append(f"blocks.{i}")
    encoder.transformer.norm.load_state_dict(visual.ln_post.state_dict())
    done.append("norm")
    return done
