"""An imported model: released towers behind mmvssl's model interface.

`ImportedModel` has what the commands read from a trained model: `encoders[modality](x)["pooled"]`,
`heads.project(modality, pooled, space)` and `heads.spaces`, `encode_video / encode_image /
encode_audio / encode_text(x, space)`, `forward(batch)`, `config` (with `sampling` and
`text.context_length`, which evaluation's `eval_spec` reads), `text_tokenizer(context_length)`
and `save_pretrained`. Each tower registers the source modules it calls (the very objects of the
source model, so fine-tuning a tower trains the source) and calls the source's own methods;
everything else the source holds is kept under `rest`, so the folder's weights are the whole
source. The towers end in the source's embedding, so every space's head is the identity.

Input conversion: mmvssl's loader gives frames normalised with 0.45 / 0.225 at the recorded
size, frame count and rate; a tower turns them back into uint8 values and applies the source's
recorded rescale / offset / mean / std (`sources.image_preprocessing`). Audio arrives as the
waveform at the source's sampling rate and goes through the source's own feature extractor,
one clip at a time (CLAP's fused models pick a random clip of a batch as "longer"; alone, a
clip is always that one, so embeddings do not depend on the batch). Text arrives as token ids from
the recorded tokenizer, padding marked -1 (`tokenizer.PAD`), turned into the source's pad id and
attention mask here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ...data.loader import VIDEO_MEAN, VIDEO_STD
from ...errors import ConfigError
from ..multimodal import SpaceEncoding
from .tokenizer import PAD

KIND = "imported"


class SpaceHeads(nn.Module):
    """Identity heads: each tower already ends in the source's embedding of its space."""

    def __init__(self, spaces: dict[str, list[str]]):
        super().__init__()
        self.spaces = {m: tuple(s) for m, s in spaces.items()}

    def project(self, modality: str, pooled: torch.Tensor, space: str) -> torch.Tensor:
        if space not in self.spaces.get(modality, ()):
            raise ConfigError(f"this imported model embeds {modality} in {', '.join(self.spaces.get(modality, ())) or 'no space'}, "
                              f"not '{space}'")
        return pooled

    def embed(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"{m}_{s}": z for m, z in pooled.items() for s in self.spaces.get(m, ())}


class Holder(nn.Module):
    """Registers named modules / parameters / persistent buffers of the source (shared, not copied)."""

    def __init__(self, source: nn.Module, names):
        super().__init__()
        for name in names:
            if name in source._modules and source._modules[name] is not None:
                self.add_module(name, source._modules[name])
            elif name in source._parameters and source._parameters[name] is not None:
                self.register_parameter(name, source._parameters[name])
            elif name in source._buffers and source._buffers[name] is not None:
                self.register_buffer(name, source._buffers[name])


def owned_names(source: nn.Module) -> list[str]:
    """Every top-level module, parameter and persistent buffer of the source."""
    buffers = [n for n, b in source._buffers.items() if b is not None and n not in source._non_persistent_buffers_set]
    return [n for n, m in source._modules.items() if m is not None] + \
           [n for n, p in source._parameters.items() if p is not None] + buffers


class Tower(Holder):
    """One modality's tower: `forward(x)` -> {"pooled": (B, D)}, the source's embedding, unnormalised."""

    def __init__(self, source: nn.Module, names, encode, width: int):
        super().__init__(source, names)
        object.__setattr__(self, "_encode", encode)  # a function of the (unregistered) source model
        self.width = width

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pooled": self._encode(x)}


def to_source_pixels(video: torch.Tensor, pre: dict) -> torch.Tensor:
    """(B, 3, T, H, W) normalised with mmvssl's 0.45 / 0.225 -> (B, T, 3, S, S) as the source's processor
    makes them: uint8 values v, then (v * rescale + offset - mean) / std; resized to S when needed."""
    B, C, T, H, W = video.shape
    frames = video.float().transpose(1, 2).reshape(B * T, C, H, W)  # (B * T, 3, H, W)
    values = (frames * VIDEO_STD.view(1, 3, 1, 1).to(frames) + VIDEO_MEAN.view(1, 3, 1, 1).to(frames)) * 255.0
    size = int(pre["size"])
    if (H, W) != (size, size):  # stills and queries of other sizes (the loader decodes at the size already)
        values = F.interpolate(values, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(pre["mean"], dtype=values.dtype, device=values.device).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"], dtype=values.dtype, device=values.device).view(1, 3, 1, 1)
    pixels = (values * float(pre["rescale"]) + float(pre["offset"]) - mean) / std
    return pixels.view(B, T, C, size, size)


def source_text_inputs(tokens: torch.Tensor, pad_id: int, with_mask: bool) -> dict:
    """(N, L) ids with PAD marking padding -> the source's input_ids (+ attention_mask)."""
    mask = tokens != PAD
    ids = torch.where(mask, tokens, torch.full_like(tokens, int(pad_id)))
    return {"input_ids": ids, "attention_mask": mask.long()} if with_mask else {"input_ids": ids}


class ImportedModel(SpaceEncoding, nn.Module):
    """A released model behind mmvssl's interface (module docstring). Built by `from_config` from a
    folder's config.json (the source rebuilt from its recorded config, then the weights loaded)."""

    def __init__(self, config: dict, source: nn.Module, towers: dict[str, tuple[list[str], object, int]],
                 tokenizer=None, feature_extractor=None, assets: dict | None = None):
        super().__init__()
        self.config = json.loads(json.dumps(config))
        object.__setattr__(self, "source", source)  # reached through the towers, registered by them
        used = set()
        self.encoders = nn.ModuleDict()
        for modality, (names, encode, width) in towers.items():
            self.encoders[modality] = Tower(source, names, encode, width)
            used.update(names)
        self.rest = Holder(source, [n for n in owned_names(source) if n not in used])
        self.heads = SpaceHeads(self.config["spaces"])
        self.tokenizer, self.feature_extractor = tokenizer, feature_extractor
        self.assets = assets or {}  # extra files written beside the weights: name -> bytes
        self._per_frame = False

    @property
    def frame_features(self) -> bool:
        """Per-frame features (`video_frames`) and tokens (`video_tokens`): not given by released towers."""
        return self._per_frame

    @frame_features.setter
    def frame_features(self, on: bool) -> None:
        if on:
            raise ConfigError(f"model '{self.name}' gives no per-frame features (video_frames): its towers end in "
                              f"the source's pooled embedding")

    token_features = frame_features

    @property
    def name(self) -> str:
        return self.config.get("name", "<imported>")

    def text_tokenizer(self, context_length: int | None = None):
        """The source's tokenizer, giving (N, context_length) ids (mmvssl.data.text.tokenizer_for)."""
        from .tokenizer import tokenizer_from_config
        if "text" not in self.encoders:  # captions are still read (and never embedded): open_clip's BPE
            return tokenizer_from_config({"tokenizer": "clip-bpe"}, None, context_length or 77)
        limit = int(self.config["text"]["context_length"])
        if context_length is not None and int(context_length) > limit:
            raise ConfigError(f"model '{self.name}' reads at most {limit} text tokens (its source's positions, "
                              f"config.json text.context_length), not {context_length}: set data.context_length={limit}")
        return tokenizer_from_config(self.config["text"], self.tokenizer, context_length)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.source, "gradient_checkpointing_enable") and enable:
            self.source.gradient_checkpointing_enable()

    def encode_video(self, video: torch.Tensor, space: str = "vat", normalize: bool = True) -> torch.Tensor:
        """(B, C, T, H, W) float -> (B, dim)."""
        return self._encode("video", video, space, normalize)

    def encode_image(self, images: torch.Tensor, space: str = "vat", normalize: bool = True) -> torch.Tensor:
        """(B, C, H, W) stills: a frame model embeds the image; a video model a static clip of it."""
        frames = int(self.config["sampling"]["num_frames"]) if self.config["source"]["pooling"] != "frames" else 1
        return self._encode("video", images[:, :, None].expand(-1, -1, frames, -1, -1), space, normalize)

    def encode_audio(self, audio: torch.Tensor, space: str = "vat", normalize: bool = True) -> torch.Tensor:
        """(B, S) waveform at the source's sampling rate -> (B, dim)."""
        return self._encode("audio", audio, space, normalize)

    def encode_text(self, tokens: torch.Tensor, space: str = "vat", normalize: bool = True) -> torch.Tensor:
        """(B, L) or (B, K, L) ids from `text_tokenizer` -> (B, dim) or (B, K, dim)."""
        if tokens.ndim == 3:
            B, K, L = tokens.shape
            return self._encode("text", tokens.reshape(B * K, L), space, normalize).view(B, K, -1)
        return self._encode("text", tokens, space, normalize)

    @torch.no_grad()
    def output_dims(self) -> dict[str, int]:
        return {f"{m}_{s}": int(self.config["widths"][m]) for m, spaces in self.heads.spaces.items() for s in spaces}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every embedding of the modalities in `batch`, normalised: `<modality>_<space>`; views
        (B, V, C, T, H, W) come back as (B, V, D), text candidates (B, K, L) as (B, K, D)."""
        out = {}
        for modality, tower in self.encoders.items():
            if modality not in batch:
                continue
            x = batch[modality]
            lead = x.shape[:2] if (modality == "video" and x.ndim == 6) or (modality == "text" and x.ndim == 3) else None
            z = tower(x.flatten(0, 1) if lead else x)["pooled"]
            for key, e in self.heads.embed({modality: z}).items():
                e = F.normalize(e, dim=-1)
                out[key] = e.view(*lead, -1) if lead else e
        return out

    # ---- persistence: config.json + model.safetensors (+ the source's tokenizer / feature extractor files)
    def state_for_saving(self) -> dict[str, torch.Tensor]:
        """Every weight once per name; tensors the source ties are cloned (safetensors refuses shared storage)."""
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from ...fsio import atomic_folder
        folder = Path(folder)
        with atomic_folder(folder) as tmp:  # fsynced, swapped in; the old folder stays until the new one is there
            (tmp / "config.json").write_text(json.dumps(self.config, indent=2))
            save_file(self.state_for_saving(), str(tmp / "model.safetensors"), metadata={"format": "pt", "kind": KIND})
            if self.tokenizer is not None and self.config.get("text", {}).get("tokenizer") == "hf":
                self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            if self.feature_extractor is not None:
                self.feature_extractor.save_pretrained(str(tmp / "feature_extractor"))
            for name, data in self.assets.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            if (folder / "check.json").is_file():  # the check of these same weights stays with them
                shutil.copy2(folder / "check.json", tmp / "check.json")
