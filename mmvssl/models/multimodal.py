"""The multimodal model: one encoder per modality, projection heads, a named embedding per space.

`forward(batch)` returns every embedding the objective may ask for, keyed `<modality>_<space>`:
video_va, video_vat, audio_va, text_vat (text as (B, K, D) when the batch carries K candidates).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from .encoders import AudioEncoder, TextEncoder, VideoEncoder
from .heads import FACHeads

ENCODERS = {"video": VideoEncoder, "audio": AudioEncoder, "text": TextEncoder}
HEADS = {"fac": FACHeads}


def _build(cls, kwargs: dict, where: str):
    """Instantiate `cls(**kwargs)`, naming the misspelt key instead of a bare TypeError."""
    params = inspect.signature(cls.__init__).parameters
    for key in kwargs:
        if key not in params or key == "self":
            allowed = ", ".join(p for p in params if p != "self")
            raise ConfigError(f"unknown key '{where}.{key}' (expected one of: {allowed})")
    missing = [p.name for p in params.values()
               if p.default is inspect.Parameter.empty and p.name != "self" and p.name not in kwargs
               and p.kind is p.POSITIONAL_OR_KEYWORD]
    if missing:
        raise ConfigError(f"missing key '{where}.{missing[0]}'")
    return cls(**kwargs)


class MultimodalModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = json.loads(json.dumps(config))  # a plain, JSON-safe copy
        name = config.get("name", "<unnamed>")
        known = set(ENCODERS) | {"name", "description", "heads", "paper", "sampling"}
        for key in config:
            if key not in known:
                raise ConfigError(f"preset '{name}': unknown key '{key}' (expected: {', '.join(sorted(known))})")
        self.encoders = nn.ModuleDict({m: _build(ENCODERS[m], dict(config[m]), f"{name}.{m}")
                                       for m in ENCODERS if m in config})
        head_cfg = dict(config.get("heads", {"type": "fac"}))
        head_type = head_cfg.pop("type", "fac")
        if head_type not in HEADS:
            raise ConfigError(f"preset '{name}': unknown heads.type '{head_type}' (expected: {', '.join(HEADS)})")
        widths = {f"{m}_width": enc.width for m, enc in self.encoders.items()}
        self.heads = _build(HEADS[head_type], {**widths, **head_cfg}, f"{name}.heads")

    @property
    def name(self) -> str:
        return self.config.get("name", "<unnamed>")

    def _encode(self, modality: str, x: torch.Tensor, space: str, normalize: bool) -> torch.Tensor:
        if modality not in self.encoders:
            raise ValueError(f"model '{self.name}' has no {modality} encoder")
        z = self.heads.project(modality, self.encoders[modality](x)["pooled"], space)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_video(self, video: torch.Tensor, space: str = "vat", normalize: bool = True) -> torch.Tensor:
        """(B, C, T, H, W) float -> (B, dim) embedding in `space`."""
        return self._encode("video", video, space, normalize)

    def encode_audio(self, audio: torch.Tensor, space: str = "va", normalize: bool = True) -> torch.Tensor:
        """(B, S) waveform -> (B, dim); space 'vat' goes through the video's va->vat head (MMV)."""
        return self._encode("audio", audio, space, normalize)

    def encode_text(self, tokens: torch.Tensor, space: str = "vat", normalize: bool = True) -> torch.Tensor:
        """(B, L) or (B, K, L) token ids -> (B, dim) or (B, K, dim)."""
        if tokens.ndim == 3:
            B, K, L = tokens.shape
            return self._encode("text", tokens.reshape(B * K, L), space, normalize).view(B, K, -1)
        return self._encode("text", tokens, space, normalize)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        out = {}
        if "video" in batch and "video" in self.encoders:
            va = self.heads.project("video", self.encoders["video"](batch["video"])["pooled"], "va")
            out["video_va"] = F.normalize(va, dim=-1)
            out["video_vat"] = F.normalize(self.heads.va_to_vat(va), dim=-1)
        if "audio" in batch and "audio" in self.encoders:
            out["audio_va"] = self.encode_audio(batch["audio"], "va")
        if "text" in batch and "text" in self.encoders:
            out["text_vat"] = self.encode_text(batch["text"], "vat")
        return out

    # ---- persistence: config.json + model.safetensors, written atomically, loaded without pickle
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp", dir=folder.parent))
        try:
            (tmp / "config.json").write_text(json.dumps(self.config, indent=2))
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str = "cpu") -> "MultimodalModel":
        folder = Path(folder)
        cfg_file, weights = folder / "config.json", folder / "model.safetensors"
        for f in (cfg_file, weights):
            if not f.is_file():
                raise ConfigError(f"not a saved mmvssl model: {f} is missing")
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: invalid JSON ({e})") from None
        model = cls(config)
        try:
            state = load_file(str(weights), device=map_location)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise ConfigError(f"{weights}: unreadable weights ({str(e).splitlines()[0]})") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{weights}: does not match {cfg_file.name} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model
