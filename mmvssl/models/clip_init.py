"""CLIP initialisation of the video transformer from an open_clip ViT (as LaViLa starts from CLIP).

The 2-D patch embedding is inflated to tubelets (the kernel repeated over the tubelet's t frames
and divided by t, so a static clip gives the image's patch features), the blocks map one to one
(ln_1 / attn.in_proj / attn.out_proj / ln_2 / mlp.c_fc / mlp.c_proj -> norm1 / attn.qkv /
attn.proj / norm2 / mlp.0 / mlp.2, same q, k, v layout), ln_post becomes the final norm and the
class token the aggregation token. CLIP's joint 2-D position table is factorised into mmvssl's
height and width tables (row means and centred column means, interpolated to the encoder's
grid); the temporal table keeps its initialisation. CLIP's ln_pre has no counterpart: this is a
starting point, not an exact copy. The blocks take CLIP's activation: OpenAI's weights were trained
with QuickGELU, so a tower initialised from them switches to it (`act: quick_gelu` in the saved
config, so the model reloads the same).

The text tower (LaViLa starts both towers from CLIP) maps the same way: token and position
embeddings, blocks, ln_final -> the final norm, and text_projection -> the text head's linear
layer when its shape matches (bias zeroed). It needs `text.causal: true` in the preset (CLIP's
text tower is causal and pools its end-of-text token); with a GELU open_clip model the copy
computes open_clip's encode_text exactly (tests/test_clip_init.py).

`model.init_arch` / `model.init_pretrained` / `model.init_towers` in the config apply it when
the engine builds the model (default off; towers default [video]).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .transformer import activation

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
    if getattr(encoder, "stem", None) is not None:
        raise ConfigError("model.init_arch: the video transformer has a convolutional stem (video.stem: conv); "
                          "CLIP's patch embedding inflates only into the patch stem (video.stem: patch)")
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
    done += _copy_blocks(blocks, encoder.transformer.blocks, "video")
    encoder.transformer.norm.load_state_dict(visual.ln_post.state_dict())
    done.append("norm")
    return done


def clip_activation(blocks, tower: str) -> str:
    """The mmvssl name of the activation in a CLIP tower's MLPs: quick_gelu (OpenAI's models) or gelu."""
    act = blocks[0].mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ConfigError(f"model.init_arch: the CLIP {tower} tower's MLP activation {act!r} has no counterpart "
                      f"(expected GELU or QuickGELU)")


def _copy_blocks(blocks, targets, tower: str) -> list[str]:
    act = clip_activation(blocks, tower)
    done = []
    for i, (src, dst) in enumerate(zip(blocks, targets)):
        dst.mlp[1] = activation(act)  # parameter-free: only what it computes changes
        target = dict(dst.named_parameters())
        for name, value in src.named_parameters():
            mapped = next((name.replace(a, b, 1) for a, b in BLOCK_MAP.items() if name.startswith(a)), None)
            if mapped not in target or target[mapped].shape != value.shape:
                raise ConfigError(f"model.init_arch: CLIP block {i} parameter '{name}' has no counterpart "
                                  f"of shape {tuple(value.shape)} in the {tower} encoder")
            target[mapped].copy_(value)
        done.append(f"blocks.{i}")
    return done


def _text_head(heads: nn.Module) -> nn.Linear | None:
    """The linear layer that takes the text encoder's pooled output into its space: FAC, shared or
    disjoint heads (models/heads.py) name it differently."""
    modules = dict(heads.named_modules())
    return next((m for name in ("text_to_vat", "to_vat.text", "proj.text_vt")
                 if isinstance(m := modules.get(name), nn.Linear)), None)


@torch.no_grad()
def init_clip_text_tower(encoder: nn.Module, clip: nn.Module, heads: nn.Module | None = None) -> list[str]:
    """Copy an open_clip model's text tower into a mmvssl TextEncoder (and its projection into the
    text head when the shapes match); returns the names set."""
    if not hasattr(clip, "token_embedding") or not hasattr(clip, "transformer"):
        raise ConfigError(f"model.init_towers: text: the open_clip model {type(clip).__name__} has no built-in "
                          f"CLIP text tower (token_embedding + transformer) to copy")
    if getattr(encoder, "in_proj", None) is not None or getattr(encoder, "pos", None) is None:
        raise ConfigError("model.init_towers: text: CLIP initialisation needs a text transformer with its own "
                          "blocks and absolute positions (not modality-agnostic, not relative_buckets)")
    if not getattr(encoder, "causal", False):
        raise ConfigError("model.init_towers: text: set text.causal: true in the preset; CLIP's text tower is "
                          "causal and pools its end-of-text token")
    pool = getattr(clip, "text_pool_type", "argmax")
    if pool not in ("argmax", "last") or getattr(clip, "cls_emb", None) is not None:
        raise ConfigError(f"model.init_towers: text: the open_clip text tower pools with '{pool}'; only CLIP's "
                          f"end-of-text pooling (argmax / last) has a counterpart")
    vocab, width = clip.token_embedding.weight.shape
    blocks = list(clip.transformer.resblocks)
    if encoder.token_embed.weight.shape != (vocab, width) or len(encoder.transformer.blocks) != len(blocks):
        raise ConfigError(f"model.init_towers: text: the CLIP text tower has vocabulary {vocab}, width {width} and "
                          f"{len(blocks)} blocks, the text encoder {tuple(encoder.token_embed.weight.shape)[0]}, "
                          f"{encoder.width} and {len(encoder.transformer.blocks)}: set text.vocab_size / width / "
                          f"depth in the preset to match")
    pos = clip.positional_embedding  # (context, D)
    if encoder.context_length > pos.shape[0]:
        raise ConfigError(f"model.init_towers: text: the text encoder's context_length {encoder.context_length} "
                          f"exceeds CLIP's {pos.shape[0]}")
    encoder.token_embed.weight.copy_(clip.token_embedding.weight)
    encoder.pos.copy_(pos[None, :encoder.context_length])
    done = ["token_embed", "pos"] + _copy_blocks(blocks, encoder.transformer.blocks, "text")
    encoder.transformer.norm.load_state_dict(clip.ln_final.state_dict())
    done.append("norm")
    head = _text_head(heads) if heads is not None else None
    projection = getattr(clip, "text_projection", None)
    if isinstance(projection, nn.Linear):  # open_clip's proj_bias variant
        weight, bias = projection.weight, projection.bias
    else:
        weight, bias = (projection.t() if projection is not None else None), None
    if head is not None and weight is not None and head.weight.shape == weight.shape:
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.copy_(bias if bias is not None else torch.zeros_like(head.bias))
        done.append("text_head")
    return done


def init_from_clip(net: nn.Module, arch: str, pretrained: str = "", towers=("video",)) -> list[str]:
    """The towers of a MultimodalModel `net` named in `towers` (video, text) from open_clip model
    `arch` with weights `pretrained`; returns the names set, prefixed by tower."""
    from ..teacher.model import create_open_clip
    unknown = sorted(set(towers) - {"video", "text"})
    if unknown or not towers:
        raise ConfigError(f"model.init_towers: {list(towers)}: expected a non-empty list of video, text")
    for tower in towers:
        if tower not in net.encoders:
            raise ConfigError(f"model.init_towers: the preset has no {tower} encoder to initialise")
    clip = create_open_clip(arch, pretrained, arch_key="model.init_arch", pretrained_key="model.init_pretrained")
    done = []
    if "video" in towers:
        done += [f"video.{n}" for n in inflate_clip_into_video_encoder(net.encoders["video"], clip.visual)]
        net.config["video"]["act"] = clip_activation(list(clip.visual.transformer.resblocks), "video")
    if "text" in towers:
        done += [f"text.{n}" for n in init_clip_text_tower(net.encoders["text"], clip, net.heads)]
        net.config["text"]["act"] = clip_activation(list(clip.transformer.resblocks), "text")
    return done
