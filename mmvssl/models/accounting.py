"""Counting a preset without building it for real: parameters and FLOPs on the meta device.

A model built under `torch.device("meta")` has shapes but no storage, so a 300M-parameter preset
builds in a fraction of a second, and a forward pass under FlopCounterMode counts its FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .multimodal import MultimodalModel


def build_on_meta(config: dict) -> MultimodalModel:
    """The model a preset describes, with meta tensors (no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = MultimodalModel(config)
    return model.to("meta")  # fixed buffers computed on the CPU (log-mel filterbanks) follow


def count_parameters(module: nn.Module) -> int:
    """Parameters of `module` (a shared backbone counted once)."""
    return sum(p.numel() for p in module.parameters())


def backbone_parameters(encoder: nn.Module) -> int:
    """An encoder's parameters without a text vocabulary's embedding table (VATT's Table 7 counts
    the transformer, the tubelet / patch embedding and the positions; its text used frozen word2vec)."""
    skip = {id(p) for name, p in encoder.named_parameters() if name.startswith("token_embed.")}
    return sum(p.numel() for p in encoder.parameters() if id(p) not in skip)


def example_inputs(config: dict, batch: int = 1, candidates: int = 1, device="cpu") -> dict[str, torch.Tensor]:
    """A batch of the input sizes the preset was built for: video (B, 3, T, H, W), audio (B, S),
    text (B, K, L) ids."""
    out = {}
    if "video" in config:
        v = config["video"]
        out["video"] = torch.randn(batch, 3, v.get("num_frames", 32), v.get("image_size", 224),
                                   v.get("image_size", 224), device=device)
    if "audio" in config:
        out["audio"] = torch.randn(batch, config["audio"].get("num_samples", 153600), device=device) * 0.1
    if "text" in config:
        length = config["text"].get("context_length", 77)
        out["text"] = torch.randint(1, 1000, (batch, candidates, length), device=device)
    return out


def flops_per_clip(config: dict) -> dict[str, int]:
    """Forward FLOPs of each encoder (and the heads) for one clip, one caption, in eval mode (no
    DropToken), counted on the meta device. A multiply-add counts as 2 FLOPs."""
    model = build_on_meta(config).eval()
    inputs = example_inputs(config, device="meta")
    flops = {}
    with torch.no_grad():
        for modality, x in inputs.items():
            x = x[:, 0] if modality == "text" else x
            with FlopCounterMode(display=False) as counter:
                model.encoders[modality](x)
            flops[modality] = counter.get_total_flops()
    flops["total"] = sum(flops.values())
    return flops
