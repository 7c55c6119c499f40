"""The multimodal model: one encoder per modality, projection heads, a named embedding per space.

`forward(batch)` returns every embedding the objective may ask for, keyed `<modality>_<space>`
(FAC heads: video_va, video_vat, audio_va, text_vat; text as (B, K, D) when the batch carries K
candidates), L2-normalised. A modality-agnostic preset adds `backbone`, the one Transformer all
its encoders share. With `frame_features` set (the engine sets it when an objective term asks
for `video_frames`), forward also returns `video_frames` (B, t, width): the video transformer's
tokens averaged per temporal position, unnormalised, for per-frame distillation.

Motion streams (`flow:` / `tgrad:` preset sections, modalities.MOTION_CHANNELS) are encoded like
video, views folded the same way, and embedded by heads that have a space for them (projection:
`flow_ssl`; shared: `flow_vat`). `tgrad` is computed here when the batch has none: between each
frame of `video` and the source frame decoded right after it (`video_next`, the loader's with
SampleSpec.next_frames), or, in a batch without `video_next`, between the sampled frames themselves
(mmvssl.data.motion.temporal_gradient).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..data.motion import temporal_gradient
from ..fsio import atomic_folder
from .safeload import check_config_fits_weights
from ..modalities import MODALITIES, MOTION_CHANNELS, VIDEO_LIKE
from .builders import build, build_backbone, build_encoders
from .heads import HEADS

TOP_LEVEL_KEYS = ("name", "description", "paper", "sampling", "backbone", "heads", *MODALITIES)


class SpaceEncoding:
    """The encode_* plumbing shared by every model behind mmvssl's interface (this one and an imported
    one, models/imported/model.py): `encoders` (modality -> module returning {"pooled": ...}) and
    `heads.project(modality, pooled, space)`."""

    def _encoder(self, modality: str) -> nn.Module:
        if modality not in self.encoders:
            raise ValueError(f"model '{self.name}' has no {modality} encoder")
        return self.encoders[modality]

    def _encode(self, modality: str, x: torch.Tensor, space: str, normalize: bool) -> torch.Tensor:
        z = self.heads.project(modality, self._encoder(modality)(x)["pooled"], space)
        return F.normalize(z, dim=-1) if normalize else z


class MultimodalModel(SpaceEncoding, nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = json.loads(json.dumps(config))  # a plain, JSON-safe copy
        name = config.get("name", "<unnamed>")
        for key in config:
            if key not in TOP_LEVEL_KEYS:
                raise ConfigError(f"preset '{name}': unknown key '{key}' (expected: {', '.join(TOP_LEVEL_KEYS)})")
        backbone = build_backbone(config, name)
        if backbone is not None:
            self.backbone = backbone  # registered once here; the encoders hold unregistered references
        self.encoders = build_encoders(config, name, backbone)
        if not self.encoders:
            raise ConfigError(f"preset '{name}' has no video, audio or text section")
        head_cfg = dict(config.get("heads", {"type": "fac"}))
        head_type = head_cfg.pop("type", "fac")
        if head_type not in HEADS:
            raise ConfigError(f"preset '{name}': unknown heads.type '{head_type}' (expected: {', '.join(HEADS)})")
        widths = {f"{m}_width": enc.width for m, enc in self.encoders.items()}
        for m in MOTION_CHANNELS:
            if f"{m}_width" in widths and m not in HEADS[head_type].spaces:
                raise ConfigError(f"preset '{name}': heads.type '{head_type}' has no space for the {m} stream "
                                  f"(use heads.type projection or shared)")
        self.heads = build(HEADS[head_type], {**widths, **head_cfg}, f"{name}.heads")
        self.frame_features = False  # forward also returns video_frames (B, t, width)
        self.token_features = False  # forward also returns video_tokens (B, N, width), the encoder's token outputs

    @property
    def name(self) -> str:
        return self.config.get("name", "<unnamed>")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass (same gradients, less memory)."""
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = enable

    def encode_video(self, video: torch.Tensor, space: str = "vat", normalize: bool = True) -> torch.Tensor:
        """(B, C, T, H, W) float -> (B, dim) embedding in `space`."""
        return self._encode("video", video, space, normalize)

    def encode_image(self, images: torch.Tensor, space: str = "vat", normalize: bool = True) -> torch.Tensor:
        """(B, C, H, W) stills through the video network (deflated: a static clip for transformers,
        temporal filters summed for 3-D CNNs) -> (B, dim) embedding in `space`."""
        z = self.heads.project("video", self._encoder("video").forward_image(images)["pooled"], space)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_audio(self, audio: torch.Tensor, space: str = "va", normalize: bool = True) -> torch.Tensor:
        """(B, S) waveform -> (B, dim); with FAC heads, space 'vat' goes through the video's va->vat head (MMV)."""
        return self._encode("audio", audio, space, normalize)

    def encode_text(self, tokens: torch.Tensor, space: str = "vat", normalize: bool = True) -> torch.Tensor:
        """(B, L) or (B, K, L) token ids -> (B, dim) or (B, K, dim)."""
        if tokens.ndim == 3:
            B, K, L = tokens.shape
            return self._encode("text", tokens.reshape(B * K, L), space, normalize).view(B, K, -1)
        return self._encode("text", tokens, space, normalize)

    @torch.no_grad()
    def output_dims(self) -> dict[str, int]:
        """The last dimension of every output forward can give (heads run on zeros, in eval mode)."""
        was_training = self.heads.training
        self.heads.eval()
        device = next(self.heads.parameters()).device
        pooled = {m: torch.zeros(2, enc.width, device=device) for m, enc in self.encoders.items()}
        dims = {k: z.shape[-1] for k, z in self.heads.embed(pooled).items()}
        self.heads.train(was_training)
        if "video" in self.encoders:
            dims["video_frames"] = self.encoders["video"].width
        return dims

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every embedding the heads define for the modalities in `batch`, normalised.

        Several views of each clip, video (B, V, C, T, H, W), are folded into the batch once
        (B * V clips through the encoder and heads, so BatchNorm sees every view) and every video
        output comes back per view: `video_<space>` (B, V, D), `video_frames` (B, V, t, width),
        `video_tokens` (B, V, N, width) when `token_features` is set."""
        pooled, text_shape, views, stream_views = {}, None, None, {}
        for modality, enc in self.encoders.items():
            if modality == "tgrad" and "tgrad" not in batch and "video" in batch:
                # consecutive decoded frames when the loader gave them (video_next), on the device
                batch = {**batch, "tgrad": temporal_gradient(batch["video"], batch.get("video_next"))}
            if modality not in batch:
                continue
            x = batch[modality]
            if modality in VIDEO_LIKE and x.ndim == 6:
                stream_views[modality] = x.shape[:2]  # (B, V)
                x = x.flatten(0, 1)  # (B * V, C, T, H, W)
            if modality == "video":
                views = stream_views.get("video")
            if modality == "text" and x.ndim == 3:
                text_shape = x.shape[:2]  # (B, K)
                x = x.reshape(-1, x.shape[-1])  # (B * K, L)
            encoded = enc(x)
            pooled[modality] = encoded["pooled"]
            if modality == "video" and self.frame_features:
                if "frames" not in encoded:
                    raise ConfigError(f"model '{self.name}': its video encoder gives no per-frame tokens "
                                      f"(video_frames); per-frame distillation needs a video transformer")
                frames = encoded["frames"]  # (B, t, width)
            if modality == "video" and self.token_features:
                tokens = encoded["tokens"]  # (B, N, width): t x h x w tokens in that order (no DropToken)
        out = {}
        for key, z in self.heads.embed(pooled).items():
            z = F.normalize(z, dim=-1)
            if key.startswith("text_") and text_shape:
                z = z.view(*text_shape, -1)  # (B, K, D)
            elif key.split("_", 1)[0] in stream_views:
                z = z.view(*stream_views[key.split("_", 1)[0]], -1)  # (B, V, D)
            out[key] = z
        if self.frame_features and "video" in pooled:
            out["video_frames"] = frames.view(*views, *frames.shape[1:]) if views else frames
        if self.token_features and "video" in pooled:
            out["video_tokens"] = tokens.view(*views, *tokens.shape[1:]) if views else tokens
        return out

    # ---- persistence: config.json + model.safetensors, written atomically, loaded without pickle
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(folder) as tmp:  # fsynced, swapped in; the old folder stays until then
            (tmp / "config.json").write_text(json.dumps(self.config, indent=2))
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

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
        check_config_fits_weights(lambda: cls(config), cfg_file, weights)  # on the meta device, before any memory
        model = cls(config)
        try:
            state = load_file(str(weights), device=map_location)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise ConfigError(f"{weights}: unreadable weights ({str(e).splitlines()[0]})") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{weights}: does not match {cfg_file.name} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.to(map_location)
