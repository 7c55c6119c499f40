"""Source -> ImportedModel (`import_source`) and folder -> ImportedModel (`load_imported`).

Importing reads the source through its own library (transformers' `AutoModel.from_pretrained`, or
open_clip's `create_model`), records what mmvssl needs to rebuild and feed it (the source's config,
its towers and spaces, its preprocessing, its tokenizer and feature extractor files) and returns the
model; `save_pretrained` writes the folder. Loading rebuilds the source from the recorded config
(random weights, on the CPU) and loads model.safetensors into it, strictly: nothing is unpickled.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ...errors import ConfigError, MmvsslError
from .model import KIND, ImportedModel, owned_names, source_text_inputs, to_source_pixels
from .sources import (DEFAULT_POOLED_FRAMES, FRAME_MODELS, KINDS, audio_preprocessing, image_preprocessing,
                      parse_source, text_context, transformers_kind)

OPEN_CLIP_DIR = "open_clip"


def _pooled(out) -> torch.Tensor:
    """transformers' get_*_features give a tensor (v4) or an output whose pooler_output it is (v5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _frames_mean(per_frame: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B * T, D) frame embeddings -> (B, D): each L2-normalised, then averaged (CLIP4Clip meanP)."""
    return F.normalize(per_frame, dim=-1).view(B, T, -1).mean(dim=1)


# ---- towers: functions of the source model (video (B, 3, T, H, W) mmvssl-normalised, text ids, waveform)

def transformers_towers(model_type: str, source, config: dict, feature_extractor=None) -> dict:
    kind, pre, text = KINDS[model_type], config.get("preprocess", {}), config.get("text", {})
    widths = config["widths"]
    fns = {}

    def pixels(video):
        return to_source_pixels(video, pre)  # (B, T, 3, S, S)

    if model_type == "xclip":
        fns["video"] = lambda v: _pooled(source.get_video_features(pixel_values=pixels(v)))
    elif model_type in ("videomae",):
        fns["video"] = lambda v: source(pixel_values=pixels(v)).last_hidden_state.mean(dim=1)
    elif model_type == "vjepa2":
        fns["video"] = lambda v: source(pixel_values_videos=pixels(v), skip_predictor=True).last_hidden_state.mean(dim=1)
    elif model_type in ("timesformer", "vivit"):
        fns["video"] = lambda v: source(pixel_values=pixels(v)).last_hidden_state[:, 0]
    elif model_type in ("clip", "siglip"):
        def frames(v):
            p = pixels(v)
            return _frames_mean(_pooled(source.get_image_features(pixel_values=p.flatten(0, 1))), *p.shape[:2])
        fns["video"] = frames
    if "text" in kind.towers:
        fns["text"] = lambda t: _pooled(source.get_text_features(
            **source_text_inputs(t, text["pad_id"], text.get("attention_mask", True))))
    if "audio" in kind.towers:
        rate = int(config["audio"]["sampling_rate"])

        def audio(wave):
            feats = []
            for clip in wave.detach().float().cpu().numpy():  # one clip a call (see model.py on CLAP's fusion)
                f = feature_extractor([clip], sampling_rate=rate, return_tensors="pt")
                feats.append(_pooled(source.get_audio_features(input_features=f["input_features"].to(wave.device),
                                                               is_longer=f["is_longer"].to(wave.device))))
            return torch.cat(feats)
        fns["audio"] = audio
    names = set(owned_names(source))
    return {m: ([n for n in kind.towers[m] if n in names], fn, int(widths[m])) for m, fn in fns.items()}


def open_clip_towers(source, config: dict) -> dict:
    pre = config["preprocess"]

    def video(v):
        p = to_source_pixels(v, pre)  # (B, T, 3, S, S)
        return _frames_mean(source.encode_image(p.flatten(0, 1)), *p.shape[:2])

    towers = {"video": (["visual"], video, int(config["widths"]["video"]))}
    if "text" in config["spaces"]:
        text_names = [n for n in owned_names(source) if n not in ("visual", "logit_scale", "logit_bias")]
        towers["text"] = (text_names, lambda t: source.encode_text(t), int(config["widths"]["text"]))
    return towers


# ---- import from a source

def _hf_auto(path: str, what: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MmvsslError(f"{path}: not a transformers model folder or reachable hub name "
                          f"({str(e).splitlines()[0]})") from None


def load_source(source: str):
    """The source model exactly as its library loads it (fp32, eval), for importing and --check."""
    parsed = parse_source(source)
    if parsed["kind"] == "open_clip":
        from ...teacher.model import create_open_clip
        return create_open_clip(parsed["arch"], parsed["pretrained"], "SOURCE's open_clip ARCH",
                                "SOURCE's PRETRAINED_OR_FILE").eval()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one line per command, not a bar per weight file
    cfg = _hf_auto(source, "model")
    transformers_kind(cfg.model_type, source)
    return AutoModel.from_pretrained(source, dtype=torch.float32).eval()


def _name(source: str) -> str:
    return Path(source.rstrip("/")).name if Path(source).exists() else source.replace("/", "-").replace(":", "-")


def _import_transformers(source: str, num_frames: int | None, fps: float | None) -> ImportedModel:
    model = load_source(source)
    cfg = model.config
    mt = cfg.model_type
    kind = transformers_kind(mt, source)
    config = {"kind": KIND, "name": f"imported-{_name(source)}",
              "source": {"library": "transformers", "model_type": mt, "from": source,
                         "class": type(model).__name__, "pooling": "frames" if mt in FRAME_MODELS else mt},
              "transformers_config": cfg.to_dict(), "spaces": {m: list(s) for m, s in kind.spaces.items()},
              "towers": {m: list(n) for m, n in kind.towers.items()}, "widths": {}}
    tokenizer = feature_extractor = None
    vision = getattr(cfg, "vision_config", cfg)
    if "video" in kind.towers:
        size = int(getattr(vision, "image_size", 0) or getattr(vision, "crop_size", 0))
        own_frames = int(getattr(vision, kind.frames_key)) if kind.frames_key else None
        if own_frames and num_frames and num_frames != own_frames:
            raise MmvsslError(f"{source}: the model takes clips of {own_frames} frames (its config's "
                              f"{kind.frames_key}), not --frames {num_frames}")
        frames = own_frames or num_frames or DEFAULT_POOLED_FRAMES
        config["preprocess"] = image_preprocessing(source, kind, size)
        config["sampling"] = {"num_frames": frames, "fps": float(fps or kind.fps), "size": size}
    if "audio" in kind.towers:
        from transformers import AutoFeatureExtractor
        config["audio"] = audio_preprocessing(source)
        feature_extractor = AutoFeatureExtractor.from_pretrained(source)
        window = config["audio"]["max_length_s"]  # no video tower: one window is the source's audio length
        config.setdefault("sampling", {"num_frames": max(1, round(window)), "fps": max(1, round(window)) / window,
                                       "size": 32})
        config["sampling"]["audio_rate"] = config["audio"]["sampling_rate"]
    if "text" in kind.towers:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as e:
            raise MmvsslError(f"{source}: the text tower needs the source's tokenizer files, which do not load "
                              f"({str(e).splitlines()[0]})") from None
        text_cfg = getattr(cfg, "text_config", cfg)
        if tokenizer.pad_token_id is None:
            raise MmvsslError(f"{source}: its tokenizer has no pad token; mmvssl pads texts to a fixed length")
        config["text"] = {"tokenizer": "hf", "context_length": text_context(text_cfg, mt, tokenizer),
                          "pad_id": int(tokenizer.pad_token_id), "attention_mask": kind.text_mask}
    imported = ImportedModel(config, model, {}, tokenizer, feature_extractor)
    config["widths"] = _widths(imported, model, config, feature_extractor, mt)
    return _rebuild_towers(imported, model, config, feature_extractor)


def _widths(imported, model, config, feature_extractor, mt) -> dict:
    """Each tower's embedding width, from one tiny forward (configs name it differently per model)."""
    widths = {m: 1 for m in config["towers"]}
    config = {**config, "widths": widths}
    towers = transformers_towers(mt, model, config, feature_extractor) if mt else open_clip_towers(model, config)
    out = {}
    with torch.no_grad():
        for m, (_, fn, _) in towers.items():
            out[m] = int(fn(_probe_input(m, config, imported)).shape[-1])
    return out


def _probe_input(modality: str, config: dict, imported) -> torch.Tensor:
    s = config.get("sampling", {})
    if modality == "video":
        return torch.zeros(1, 3, int(s["num_frames"]), int(s["size"]), int(s["size"]))
    if modality == "audio":
        return torch.zeros(1, int(config["audio"]["sampling_rate"]))
    if config["text"]["tokenizer"] == "clip-bpe":
        from ...data.text import ClipBPETokenizer
        return ClipBPETokenizer(config["text"]["context_length"])(["a"])
    from .tokenizer import tokenizer_from_config
    return tokenizer_from_config(config["text"], imported.tokenizer)(["a"])


def _rebuild_towers(imported, model, config, feature_extractor, assets=None) -> ImportedModel:
    mt = config["source"].get("model_type")
    towers = (transformers_towers(mt, model, config, feature_extractor) if config["source"]["library"] == "transformers"
              else open_clip_towers(model, config))
    return ImportedModel(config, model, towers, imported.tokenizer, feature_extractor, assets or imported.assets).eval()


def _import_open_clip(source: str, num_frames: int | None, fps: float | None) -> ImportedModel:
    import open_clip
    from ...teacher.model import _model_name
    parsed = parse_source(source)
    model = load_source(source)
    name = _model_name(parsed["arch"], "SOURCE's open_clip ARCH")
    model_cfg = open_clip.get_model_config(name)
    if not model_cfg:
        raise MmvsslError(f"{source}: open_clip has no model config for '{name}' to record")
    model_cfg = json.loads(json.dumps(model_cfg))
    tag = open_clip.get_pretrained_cfg(name, parsed["pretrained"]) if parsed["pretrained"] else {}
    if tag and tag.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    pre_cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    size = pre_cfg.get("size", getattr(model.visual, "image_size", 224))
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    tok = open_clip.get_tokenizer(name) if "/" not in name else None
    from open_clip.tokenizer import SimpleTokenizer
    config = {"kind": KIND, "name": f"imported-open_clip-{_name(name)}",
              "source": {"library": "open_clip", "arch": parsed["arch"], "pretrained": parsed["pretrained"],
                         "from": source, "pooling": "frames"},
              "spaces": {"video": ["vat"]}, "towers": {"video": ["visual"]}, "widths": {},
              "preprocess": {"mean": [float(m) for m in pre_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)],
                             "std": [float(s) for s in pre_cfg.get("std", open_clip.OPENAI_DATASET_STD)],
                             "rescale": 1 / 255, "offset": 0.0, "size": size, "from": "open_clip preprocess_cfg"},
              "sampling": {"num_frames": int(num_frames or DEFAULT_POOLED_FRAMES), "fps": float(fps or 1.0),
                           "size": size}}
    hf_tokenizer = None
    if tok is not None and isinstance(tok, SimpleTokenizer):
        config["spaces"]["text"], config["towers"]["text"] = ["vat"], ["*"]
        config["text"] = {"tokenizer": "clip-bpe", "context_length": int(model_cfg["text_cfg"].get("context_length", 77))}
    elif tok is not None and hasattr(tok, "tokenizer"):  # open_clip's HFTokenizer around a transformers one
        hf_tokenizer = tok.tokenizer
        config["spaces"]["text"], config["towers"]["text"] = ["vat"], ["*"]
        config["text"] = {"tokenizer": "hf", "context_length": int(tok.context_length),
                          "pad_id": int(hf_tokenizer.pad_token_id or 0), "attention_mask": False}
    imported = ImportedModel(config, model, {}, hf_tokenizer)
    config["widths"] = _widths(imported, model, config, None, None)
    assets = {f"{OPEN_CLIP_DIR}/open_clip_config.json": json.dumps({"model_cfg": model_cfg,
                                                                    "preprocess_cfg": _json_safe(pre_cfg)}).encode()}
    return _rebuild_towers(imported, model, config, None, assets)


def _json_safe(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def import_source(source: str, num_frames: int | None = None, fps: float | None = None) -> ImportedModel:
    """A released model as an mmvssl model (not yet saved)."""
    if parse_source(source)["kind"] == "open_clip":
        return _import_open_clip(source, num_frames, fps)
    return _import_transformers(source, num_frames, fps)


# ---- load a folder

def read_folder_config(folder: str | Path) -> dict | None:
    """A model folder's config.json, or None when it is missing or not JSON (load_model names that)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_imported(config: dict) -> bool:
    return isinstance(config, dict) and config.get("kind") == KIND


def load_imported(folder: str | Path, config: dict, map_location: str = "cpu") -> ImportedModel:
    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"not a saved mmvssl model: {weights} is missing")
    library = config.get("source", {}).get("library")
    tokenizer = feature_extractor = None
    assets = {}
    if library == "transformers":
        from transformers import AutoConfig, AutoModel
        hf = dict(config["transformers_config"])
        model_type = hf.pop("model_type")
        source = AutoModel.from_config(AutoConfig.for_model(model_type, **hf), dtype=torch.float32)
        if "audio" in config["spaces"]:
            from transformers import AutoFeatureExtractor
            feature_extractor = AutoFeatureExtractor.from_pretrained(str(folder / "feature_extractor"))
    elif library == "open_clip":
        import open_clip
        assets = {f"{OPEN_CLIP_DIR}/open_clip_config.json": (folder / OPEN_CLIP_DIR / "open_clip_config.json").read_bytes()}
        source = open_clip.create_model(f"local-dir:{folder / OPEN_CLIP_DIR}", load_weights=False, device="cpu")
    else:
        raise ConfigError(f"{folder / 'config.json'}: imported model of unknown library {library!r}")
    if config.get("text", {}).get("tokenizer") == "hf":
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    shell = ImportedModel(config, source, {}, tokenizer, feature_extractor, assets)
    model = _rebuild_towers(shell, source, config, feature_extractor, assets)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ConfigError(f"{weights}: unreadable weights ({str(e).splitlines()[0]})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights}: does not match {folder / 'config.json'} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(map_location).eval()
