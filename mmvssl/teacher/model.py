"""A frozen open_clip image model applied to the student's frames: the teacher of distillation.

`load_teacher(arch, pretrained, ...)` goes through `open_clip.create_model(arch, pretrained=...)`,
so a tag (`openai`), an `hf-hub:org/repo` name or a local checkpoint file all load the same way;
`arch` may also be a model-config JSON file (registered with `open_clip.add_model_config`).
Only the image tower is kept, frozen (no parameter requires a gradient) and always in eval mode;
bf16 on GPU, fp32 on CPU.

`ImageTeacher(video)` takes the batch's video (B, 3, T, H, W), normalised with mmvssl's video
mean 0.45 / std 0.225, undoes that normalisation, resizes every frame to the teacher's image
size, applies the teacher's own mean / std, and returns
{"teacher_frames": (B, T, D)} (the pooled, projected image embedding of every frame, fp32) and,
with `patch_tokens`, {"teacher_patches": (B, T, N, width)}.

`teacher_identity(arch, pretrained, image_size)` is the fingerprint that cached features
(`mmvssl shards add-features`, mmvssl/teacher/cache.py) carry and training checks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import VIDEO_MEAN, VIDEO_STD
from ..errors import ConfigError


def _model_name(arch: str, key: str = "teacher.arch") -> str:
    """A model-config JSON file is registered with open_clip under its stem; names pass through."""
    if not arch.endswith(".json"):
        return arch
    path = Path(arch)
    if not path.is_file():
        raise ConfigError(f"{key}: model config file not found: {arch}")
    import open_clip
    open_clip.add_model_config(path)
    return path.stem


def create_open_clip(arch: str, pretrained: str = "", arch_key: str = "teacher.arch",
                     pretrained_key: str = "teacher.pretrained") -> nn.Module:
    """The whole open_clip model `arch` (a name or a model-config JSON file) with weights
    `pretrained` (a tag, an hf-hub name or a local checkpoint file), fp32 on the CPU; errors
    name the config keys they came from."""
    import open_clip
    if not arch:
        raise ConfigError(f"{arch_key} is empty: name an open_clip model (e.g. ViT-B-32) or a model-config JSON file")
    name = _model_name(arch, arch_key)
    if pretrained and not Path(pretrained).is_file() and ("/" in pretrained or pretrained.endswith((".pt", ".bin",
                                                                                                   ".safetensors"))):
        raise ConfigError(f"{pretrained_key}: checkpoint file not found: {pretrained}")
    try:
        return open_clip.create_model(name, pretrained=pretrained or None, device="cpu")
    except RuntimeError as e:
        raise ConfigError(f"{arch_key} '{arch}' ({pretrained_key} '{pretrained}'): {str(e).splitlines()[0]}") from None


def load_teacher(arch: str, pretrained: str = "", image_size: int = 0, patch_tokens: bool = False,
                 device: str | torch.device = "cpu", precision: str = "auto") -> "ImageTeacher":
    """The image tower of open_clip model `arch` with weights `pretrained`, frozen, on `device`."""
    import open_clip
    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"teacher.precision '{precision}' is unknown (expected: auto, fp32, bf16)")
    model = create_open_clip(arch, pretrained)
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean, std = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), cfg.get("std", open_clip.OPENAI_DATASET_STD)
    size = image_size or _image_size(visual)
    teacher = ImageTeacher(visual, size, mean, std, patch_tokens)
    return teacher.to(device, torch.bfloat16 if precision == "bf16" else torch.float32)


def _weights_id(pretrained: str) -> str:
    """A local checkpoint is known by its content (sha256), a tag by its name."""
    path = Path(pretrained)
    if not pretrained or not path.is_file():
        return pretrained
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def teacher_identity(arch: str, pretrained: str = "", image_size: int = 0,
                     teacher: "ImageTeacher | None" = None) -> dict:
    """The fingerprint of a teacher, for cached features: {arch (open_clip name), pretrained (tag or
    file name), weights (tag, or sha256 of the checkpoint file), image_size (the size frames are
    resized to), embed_dim}. Without a loaded `teacher`, size and width come from open_clip's model
    config (the teacher is built on the CPU only when open_clip has none, e.g. an hf-hub model)."""
    if not arch:
        raise ConfigError("teacher.arch is empty: name an open_clip model (e.g. ViT-B-32) or a model-config JSON file")
    name = _model_name(arch)
    weights = _weights_id(pretrained) or (arch if arch.startswith("hf-hub:") else "")
    identity = {"arch": name, "pretrained": Path(pretrained).name if Path(pretrained).is_file() else pretrained,
                "weights": weights}
    if teacher is None:
        import open_clip
        config = open_clip.get_model_config(name)
        if config and "embed_dim" in config:
            own = (config.get("vision_cfg") or {}).get("image_size", 224)
            own = own[0] if isinstance(own, (tuple, list)) else own
            return {**identity, "image_size": int(image_size or own), "embed_dim": int(config["embed_dim"])}
        teacher = load_teacher(arch, pretrained, image_size=image_size, device="cpu", precision="fp32")
    return {**identity, "image_size": int(teacher.image_size), "embed_dim": int(teacher.embed_dim)}


def _image_size(visual: nn.Module) -> int:
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class ImageTeacher(nn.Module):
    """Frozen image tower + the frame conversion from mmvssl's normalisation to the teacher's."""

    def __init__(self, visual: nn.Module, image_size: int, mean, std, patch_tokens: bool = False):
        super().__init__()
        self.visual = visual
        self.image_size = image_size
        self.patch_tokens = patch_tokens
        if patch_tokens and not hasattr(visual, "output_tokens"):
            raise ConfigError("teacher.patch_tokens: this open_clip image tower gives no patch tokens")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            self.embed_dim = int(self._encode(torch.zeros(1, 3, image_size, image_size))[0].shape[-1])

    def train(self, mode: bool = True) -> "ImageTeacher":
        return super().train(False)  # always eval: no dropout, frozen norm statistics

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 3, S, S) teacher-normalised images -> pooled (N, D), patch tokens (N, P, width) or None."""
        dtype = next(self.visual.parameters()).dtype
        previous = getattr(self.visual, "output_tokens", None)
        if previous is not None:
            self.visual.output_tokens = self.patch_tokens
        try:
            out = self.visual(images.to(dtype))
        finally:
            if previous is not None:
                self.visual.output_tokens = previous
        if isinstance(out, tuple):
            return out[0].float(), out[1].float()
        return out.float(), None

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.embed_frames(video)

    def embed_frames(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """forward without torch.no_grad (fine-tuning a teacher, as eval/distill_evidence.py does)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"the teacher expects the batch's video (B, 3, T, H, W), got {tuple(video.shape)} "
                             f"(multi-view samplers are not supported with a teacher)")
        B, C, T, H, W = video.shape
        frames = video.float().transpose(1, 2).reshape(B * T, C, H, W)  # (B * T, 3, H, W)
        frames = frames * VIDEO_STD.view(1, 3, 1, 1).to(frames) + VIDEO_MEAN.view(1, 3, 1, 1).to(frames)  # [0, 1]
        if (H, W) != (self.image_size, self.image_size):
            frames = F.interpolate(frames, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        frames = (frames - self.mean) / self.std
        pooled, tokens = self._encode(frames)
        out = {"teacher_frames": pooled.view(B, T, -1)}  # (B, T, D)
        if self.patch_tokens and tokens is not None:
            out["teacher_patches"] = tokens.view(B, T, *tokens.shape[1:])  # (B, T, P, width)
        return out
