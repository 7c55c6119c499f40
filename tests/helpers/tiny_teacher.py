"""A tiny open_clip ViT teacher built from a config (nothing downloaded): its model-config JSON
file and its weights saved to a local checkpoint, as `teacher.arch` / `teacher.pretrained` take them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_TEACHER = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_teacher(root: Path, seed: int = 0) -> tuple[str, str]:
    """(arch JSON path, checkpoint path) of a tiny teacher whose random weights come from `seed`."""
    import open_clip
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    arch = root / "mmvssl-tiny-teacher.json"
    arch.write_text(json.dumps(TINY_TEACHER))
    open_clip.add_model_config(arch)
    torch.manual_seed(seed)
    model = open_clip.create_model("mmvssl-tiny-teacher")
    weights = root / f"tiny_teacher_seed{seed}.pt"
    torch.save(model.state_dict(), weights)
    return str(arch), str(weights)
