"""A video classifier: a model's video encoder and a linear head over its pooled output, for
fine-tuning and the semi-supervised methods (mmvssl.methods.supervised, tg, cmpl).

It saves as the model folder every command reads (config.json + model.safetensors: the whole
MultimodalModel, so `mmvssl eval` and `mmvssl.load_model` take it as any other model) plus
`classifier.safetensors` (the head) and `classifier.json` (class names in head order, the
metadata key of the label, the task file they came from). `load_classifier(folder)` reads both.
Only the video encoder trains: the other towers and the projection heads are carried along
unchanged (their parameters take no gradient), so the folder stays a complete model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..fsio import atomic_folder
from .multimodal import MultimodalModel

HEAD_FILE, INFO_FILE = "classifier.safetensors", "classifier.json"


class VideoClassifier(nn.Module):
    """forward(batch) -> {"logits": (B, [V,] C), "pooled": (B, [V,] width)} from batch["video"]
    (B, C, T, H, W) or views (B, V, C, T, H, W)."""

    def __init__(self, backbone: MultimodalModel, classes: list[str], label_key: str = "label",
                 task: str = "", dropout: float = 0.0):
        super().__init__()
        if "video" not in backbone.encoders:
            raise ConfigError(f"model '{backbone.name}' has no video encoder to classify with")
        if backbone.config.get("kind") == "combined":  # its towers belong to its parts (models/imported/combined.py)
            raise ConfigError(f"model '{backbone.name}' joins separately trained parts; fine-tune one of them "
                              f"(its folder's parts/NAME)")
        self.backbone = backbone
        self.classes, self.label_key, self.task = list(classes), label_key, task
        width = backbone.encoders["video"].width
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, len(classes))
        nn.init.zeros_(self.head.weight)  # uniform predictions at the start (VideoMAE scales its head init by 0.001)
        nn.init.zeros_(self.head.bias)
        video = set(map(id, backbone.encoders["video"].parameters()))
        shared = set(map(id, backbone.backbone.parameters())) if hasattr(backbone, "backbone") else set()
        for p in backbone.parameters():
            p.requires_grad_(id(p) in video or id(p) in shared)

    @property
    def name(self) -> str:
        return self.backbone.name

    @property
    def config(self) -> dict:
        return self.backbone.config

    @property
    def encoder(self) -> nn.Module:
        return self.backbone.encoders["video"]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        video = batch["video"]
        views = video.shape[:2] if video.ndim == 6 else None
        pooled = self.encoder(video.flatten(0, 1) if views else video)["pooled"]  # (N, width)
        logits = self.head(self.dropout(pooled))  # (N, C)
        if views:
            pooled, logits = pooled.view(*views, -1), logits.view(*views, -1)
        return {"logits": logits, "pooled": pooled}

    def text_tokenizer(self, context_length: int):
        """The backbone's tokenizer (mmvssl.data.text.tokenizer_for): an imported model's own, else CLIP's BPE."""
        from ..data.text import tokenizer_for
        return tokenizer_for(self.backbone, context_length)

    def info(self) -> dict:
        return {"classes": self.classes, "label_key": self.label_key, "task": self.task}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """The model folder and the head, written to a temporary folder, fsynced and swapped into place."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(folder) as tmp:  # fsynced, then swapped in: the old folder outlives the swap
            self.backbone.save_pretrained(tmp / "model")
            save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                      str(tmp / "model" / HEAD_FILE), metadata={"format": "pt"})
            (tmp / "model" / INFO_FILE).write_text(json.dumps(self.info(), indent=2))
            for name in os.listdir(tmp / "model"):  # the folder's content, one level up
                os.replace(tmp / "model" / name, tmp / name)
            os.rmdir(tmp / "model")


def is_classifier(folder: str | os.PathLike) -> bool:
    return (Path(folder) / INFO_FILE).is_file() and (Path(folder) / HEAD_FILE).is_file()


def load_classifier(folder: str | os.PathLike, map_location: str = "cpu") -> VideoClassifier:
    """A folder written by VideoClassifier.save_pretrained."""
    folder = Path(folder)
    if not is_classifier(folder):
        raise ConfigError(f"{folder}: not a fine-tuned classifier ({INFO_FILE} and {HEAD_FILE} are written by "
                          f"`mmvssl finetune`); a pretrained model folder needs fine-tuning first")
    from .presets import load_model  # a trained, imported or combined folder (its config.json's kind)
    info = json.loads((folder / INFO_FILE).read_text())
    model = VideoClassifier(load_model(folder, map_location), info["classes"],
                            info.get("label_key", "label"), info.get("task", ""))
    state = load_file(str(folder / HEAD_FILE), device=map_location)
    try:
        model.head.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{folder / HEAD_FILE}: does not match {INFO_FILE} ({len(info['classes'])} classes): "
                          f"{str(e).splitlines()[-1].strip()}") from None
    return model.to(map_location)
