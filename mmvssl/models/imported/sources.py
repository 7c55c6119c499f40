"""What each released model is, for mmvssl: its towers, the source modules each tower calls, the
space its embeddings live in, how it pools, and the preprocessing it was trained with.

A source is either a transformers model (a folder written by `save_pretrained`, or a hub name that
transformers resolves where a network exists) or `open_clip:ARCH[:PRETRAINED_OR_FILE]`. The
transformers kinds, and what their towers return (the source's own methods, followed where cited):
  xclip        video: get_video_features (frames -> CLIP ViT -> MIT), text: get_text_features
               (microsoft/VideoX X-CLIP; transformers models/x_clip/modeling_x_clip.py)
  clap         audio: get_audio_features on ClapFeatureExtractor's log-mel, text: get_text_features
               (LAION-AI/CLAP; transformers models/clap)
  videomae     video: mean of the last hidden states (VideoMAE's fine-tuning head pools so,
               MCG-NJU/VideoMAE modeling_finetune.py `fc_norm(x.mean(1))`, before its fc_norm)
  vjepa2       video: mean of the encoder's last hidden states (predictor skipped)
  timesformer  video: the CLS token after the final norm (TimesformerForVideoClassification's input)
  vivit        video: the CLS token after the final norm (VivitForVideoClassification's input)
  clip, siglip video: get_image_features of every frame, each L2-normalised, averaged over time, as
               CLIP4Clip's mean pooling (ArrowLuo/CLIP4Clip modules/modeling.py, `meanP`); image:
               get_image_features; text: get_text_features
open_clip: the image tower on every frame, pooled the same way; its text tower as `encode_text`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import MmvsslError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
TEXT_CONTEXT_CAP = 77  # longer texts are truncated, as CLIP's context (the prompts and captions mmvssl embeds fit)


@dataclass(frozen=True)
class Kind:
    """One transformers model type: which source modules each tower calls (every other module and
    parameter of the source is kept in the folder too), the spaces, the defaults for sampling."""
    towers: dict[str, tuple[str, ...]]
    spaces: dict[str, tuple[str, ...]]
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    fps: float = 8.0
    frames_key: str = "num_frames"  # where the config names the clip's frame count (None: frames pooled)
    text_mask: bool = True  # the text tower takes an attention mask (SigLIP: fixed padding, no mask)
    notes: dict = field(default_factory=dict)


VIDEO_ONLY = {"video": ("ssl",)}
KINDS: dict[str, Kind] = {
    # X-CLIP: 8 frames sampled over the clip; its processor is CLIP's (mean/std, 224 crop)
    "xclip": Kind({"video": ("vision_model", "visual_projection", "mit"), "text": ("text_model", "text_projection")},
                  {"video": ("vat",), "text": ("vat",)}, CLIP_MEAN, CLIP_STD, fps=4.0),
    "clap": Kind({"audio": ("audio_model", "audio_projection"), "text": ("text_model", "text_projection")},
                 {"audio": ("vat",), "text": ("vat",)}, frames_key=""),
    # VideoMAE: 16 frames with a stride of 4 at 30 fps (7.5 fps); V-JEPA 2 the same stride
    "videomae": Kind({"video": ("embeddings", "encoder", "layernorm")}, VIDEO_ONLY, fps=7.5),
    "vjepa2": Kind({"video": ("encoder",)}, VIDEO_ONLY, fps=7.5, frames_key="frames_per_clip"),
    # TimeSformer: 8 frames with a stride of 32 at 30 fps; ViViT: 32 frames with a stride of 2
    "timesformer": Kind({"video": ("embeddings", "encoder", "layernorm")}, VIDEO_ONLY, fps=30 / 32),
    "vivit": Kind({"video": ("embeddings", "encoder", "layernorm")}, VIDEO_ONLY, HALF, HALF, fps=15.0),
    "clip": Kind({"video": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")},
                 {"video": ("vat",), "text": ("vat",)}, CLIP_MEAN, CLIP_STD, fps=1.0, frames_key=""),
    "siglip": Kind({"video": ("vision_model",), "text": ("text_model",)},
                   {"video": ("vat",), "text": ("vat",)}, HALF, HALF, fps=1.0, frames_key="", text_mask=False),
}
FRAME_MODELS = ("clip", "siglip", "open_clip")
DEFAULT_POOLED_FRAMES = 8  # frames pooled over time for image models (CLIP4Clip uses 12 at 1 fps)


def parse_source(source: str) -> dict:
    """'open_clip:ARCH[:PRETRAINED_OR_FILE]' -> {kind: open_clip, arch, pretrained}; anything else is a
    transformers folder or hub name -> {kind: transformers, path}."""
    if source.startswith("open_clip:"):
        rest = source[len("open_clip:"):]
        prefix = ""
        for schema in ("hf-hub:", "local-dir:"):
            if rest.startswith(schema):
                prefix, rest = schema, rest[len(schema):]
        arch, _, pretrained = rest.partition(":")
        if not arch:
            raise MmvsslError(f"{source}: name an open_clip architecture (open_clip:ARCH[:PRETRAINED_OR_FILE])")
        return {"kind": "open_clip", "arch": prefix + arch, "pretrained": pretrained}
    return {"kind": "transformers", "path": source}


def transformers_kind(model_type: str, source: str) -> Kind:
    if model_type not in KINDS:
        raise MmvsslError(f"{source}: transformers model type '{model_type}' cannot be imported "
                          f"(supported: {', '.join(KINDS)}, or open_clip:ARCH)")
    return KINDS[model_type]


def _optional_file(source: str, name: str) -> Path | None:
    """`name` inside a local folder, or fetched by transformers for a hub name; None when absent."""
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    from transformers.utils import cached_file
    found = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def _first(value, *keys):
    if isinstance(value, dict):
        for k in keys:
            if k in value:
                return int(value[k])
        return None
    return int(value) if value else None


def image_preprocessing(source: str, kind: Kind, image_size: int) -> dict:
    """The source's frame conversion from its saved processor (preprocessor_config.json or
    video_preprocessor_config.json: mean, std, rescale factor and offset, crop size), else the kind's
    defaults: pixel = (uint8 * rescale + offset - mean) / std, frames of `size` x `size`."""
    pre = {"mean": list(kind.mean), "std": list(kind.std), "rescale": 1 / 255, "offset": 0.0, "size": image_size,
           "from": "defaults"}
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = _optional_file(source, name)
        if path is None:
            continue
        cfg = json.loads(path.read_text())
        if "image_mean" not in cfg:
            continue  # an audio feature extractor
        pre.update(mean=[float(m) for m in cfg["image_mean"]], std=[float(s) for s in cfg["image_std"]],
                   rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
                   offset=-1.0 if cfg.get("offset") and cfg.get("do_rescale", True) else 0.0, **{"from": name})
        if not cfg.get("do_normalize", True):
            pre.update(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
        crop = _first(cfg.get("crop_size"), "height", "shortest_edge") if cfg.get("do_center_crop", True) else None
        size = crop or _first(cfg.get("size"), "shortest_edge", "height")
        if size and size != image_size:
            raise MmvsslError(f"{source}: its processor crops frames to {size} px but the model takes {image_size} px; "
                              f"mmvssl serves one frame size per model")
        break
    return pre


def audio_preprocessing(source: str) -> dict:
    """CLAP's feature extractor settings (preprocessor_config.json); it is saved into the folder too."""
    path = _optional_file(source, "preprocessor_config.json")
    if path is None:
        raise MmvsslError(f"{source}: no preprocessor_config.json; the audio tower needs the source's "
                          f"feature extractor (sampling rate, mel bins, padding), saved with it by save_pretrained")
    cfg = json.loads(path.read_text())
    if "sampling_rate" not in cfg:
        raise MmvsslError(f"{path}: not an audio feature extractor (no sampling_rate)")
    return {"sampling_rate": int(cfg["sampling_rate"]), "max_length_s": float(cfg.get("max_length_s", 10)),
            "truncation": cfg.get("truncation"), "padding": cfg.get("padding"), "feature_size": cfg.get("feature_size")}


def text_context(config, model_type: str, tokenizer) -> int:
    """Tokens per text: the text model's positions (RoBERTa's start after the pad id), capped at 77;
    SigLIP pads to exactly its positions (it pools the last one)."""
    positions = int(config.max_position_embeddings)
    if model_type == "clap":
        positions -= int(config.pad_token_id or 0) + 1
    limit = getattr(tokenizer, "model_max_length", positions) or positions
    positions = min(positions, int(limit) if limit < 1_000_000 else positions)
    return positions if model_type == "siglip" else min(positions, TEXT_CONTEXT_CAP)
