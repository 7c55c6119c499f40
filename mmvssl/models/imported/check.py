"""`mmvssl models import --check`: the source's own forward against the imported folder's.

Both see the same preprocessed random input: uint8 frames of the recorded size and count (the
source gets them as its processor would make them, (v * rescale + offset - mean) / std, the
imported model through mmvssl's loader normalisation and back), the same waveform at the source's
sampling rate (the source's own feature extractor from SOURCE, the imported one from the folder),
and the same texts (the source's tokenizer from SOURCE with its own padding, the imported one from
the folder). The source is loaded again from SOURCE by its own library, the imported model from
the saved folder, so the check covers the weights on disk. check.json holds the max absolute
difference of each L2-normalised embedding ({"video": ..., "text": ...}); above the tolerance
(1e-4, fp32) the command fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...data.loader import frames_to_tensor
from ...errors import MmvsslError
from .build import _pooled, load_source
from .sources import parse_source

TOLERANCE = 1e-4
CHECK_TEXTS = ["a red circle moves to the left", "The sound of a blue square, bouncing up and down!"]


def _source_pixels(frames: torch.Tensor, pre: dict) -> torch.Tensor:
    """(B, T, S, S, 3) uint8 -> (B, T, 3, S, S) as the source's processor normalises them."""
    x = frames.permute(0, 1, 4, 2, 3).double() * float(pre["rescale"]) + float(pre["offset"])
    mean = torch.tensor(pre["mean"], dtype=torch.float64).view(1, 1, 3, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float64).view(1, 1, 3, 1, 1)
    return ((x - mean) / std).float()


def _reference_video(src, config: dict, pixels: torch.Tensor) -> torch.Tensor:
    """The source's own video (or frame) embedding, called as its library documents it."""
    library, mt = config["source"]["library"], config["source"].get("model_type")
    B, T = pixels.shape[:2]
    if library == "open_clip" or mt in ("clip", "siglip"):
        frames = pixels.flatten(0, 1)
        z = src.encode_image(frames) if library == "open_clip" else _pooled(src.get_image_features(pixel_values=frames))
        return F.normalize(z, dim=-1).view(B, T, -1).mean(dim=1)
    if mt == "xclip":
        return _pooled(src.get_video_features(pixel_values=pixels))
    if mt == "vjepa2":
        return src(pixel_values_videos=pixels, skip_predictor=True).last_hidden_state.mean(dim=1)
    hidden = src(pixel_values=pixels).last_hidden_state
    return hidden.mean(dim=1) if mt == "videomae" else hidden[:, 0]


def _reference_text(src, source: str, config: dict) -> torch.Tensor:
    if config["source"]["library"] == "open_clip":
        import open_clip
        from ...teacher.model import _model_name
        tok = open_clip.get_tokenizer(_model_name(parse_source(source)["arch"]))
        return src.encode_text(tok(CHECK_TEXTS))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(source)
    if config["text"].get("attention_mask", True):
        enc = tok(CHECK_TEXTS, padding=True, truncation=True, max_length=config["text"]["context_length"],
                  return_tensors="pt")
        return _pooled(src.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    enc = tok(CHECK_TEXTS, padding="max_length", truncation=True, max_length=config["text"]["context_length"],
              return_tensors="pt")  # SigLIP: fixed padding, no mask
    return _pooled(src.get_text_features(input_ids=enc["input_ids"]))


def _reference_audio(src, source: str, wave: torch.Tensor, rate: int) -> torch.Tensor:
    from transformers import AutoFeatureExtractor
    fe = AutoFeatureExtractor.from_pretrained(source)
    out = []
    for clip in wave.numpy():
        f = fe([clip], sampling_rate=rate, return_tensors="pt")
        out.append(_pooled(src.get_audio_features(input_features=f["input_features"], is_longer=f["is_longer"])))
    return torch.cat(out)


@torch.no_grad()
def check_import(model, source: str, folder: str | Path, tolerance: float = TOLERANCE, seed: int = 0) -> dict:
    """Compare, write folder/check.json, and raise MmvsslError above `tolerance`."""
    config = model.config
    src = load_source(source)
    g = torch.Generator().manual_seed(seed)
    diffs, inputs = {}, {}
    if "video" in model.encoders:
        s = config["sampling"]
        frames = torch.randint(0, 256, (2, int(s["num_frames"]), int(s["size"]), int(s["size"]), 3), generator=g,
                               dtype=torch.uint8)
        ours = model.encode_video(torch.stack([frames_to_tensor(f.numpy()) for f in frames]),
                                  model.heads.spaces["video"][0])
        theirs = F.normalize(_reference_video(src, config, _source_pixels(frames, config["preprocess"])), dim=-1)
        diffs["video"] = float((ours - theirs).abs().max())
        inputs["video"] = list(frames.shape)
    if "audio" in model.encoders:
        rate = int(config["audio"]["sampling_rate"])
        wave = torch.from_numpy(np.random.default_rng(seed).uniform(-0.5, 0.5, (2, rate)).astype(np.float32))
        ours = model.encode_audio(wave, model.heads.spaces["audio"][0])
        theirs = F.normalize(_reference_audio(src, source, wave, rate), dim=-1)
        diffs["audio"] = float((ours - theirs).abs().max())
        inputs["audio"] = list(wave.shape)
    if "text" in model.encoders:
        ours = model.encode_text(model.text_tokenizer()(CHECK_TEXTS), model.heads.spaces["text"][0])
        theirs = F.normalize(_reference_text(src, source, config), dim=-1)
        diffs["text"] = float((ours - theirs).abs().max())
        inputs["text"] = CHECK_TEXTS
    report = {**diffs, "tolerance": tolerance, "passed": all(d <= tolerance for d in diffs.values()),
              "source": source, "dtype": "float32", "seed": seed, "inputs": inputs,
              "compared": "max |a - b| of the L2-normalised embeddings"}
    Path(folder, "check.json").write_text(json.dumps(report, indent=2))
    if not report["passed"]:
        worst = max(diffs, key=diffs.get)
        raise MmvsslError(f"--check failed: the imported {worst} embedding differs from {source}'s by "
                          f"{diffs[worst]:.2e} (tolerance {tolerance:.0e}); see {Path(folder, 'check.json')}")
    return report
