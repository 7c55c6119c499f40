"""Frozen features: every sample of a shard set embedded once, in every modality and space the
model has, saved as safetensors + a JSON sidecar and reused by every protocol.

A feature set is a plain dict:
  keys, captions (first caption per sample), labels (metadata label or None), sources (shard of
  each sample), text_captions + text_owner (every caption of every sample, MSR-VTT style, and the
  sample it belongs to), has_audio / has_text (N,) bool, failed (samples that did not decode),
  `<modality>_<space>` tensors: video_pooled / audio_pooled (encoder outputs, unnormalised) and
  L2-normalised embeddings video_va, video_vat, audio_va, audio_vat (N, D), text_vat (M, D);
  info: which model (name, path, fingerprint), data, sampling.

Multi-clip: `num_clips` windows spread uniformly over each video (`uniform_windows`); multi-crop:
`num_crops` = 3 takes left/centre/right (or top/centre/bottom) squares of the frames resized to
the short side. Views are averaged (embeddings re-normalised after the mean).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds

from ..data.decode import DecodeError, decode_window, probe
from ..data.loader import SampleSpec, frames_to_tensor, list_shards
from ..data.rawsample import metadata, video_bytes
from ..data.shardio import MemberLimits, skip_unreadable_shard, tar_stage
from ..data.sampling import uniform_windows
from ..data.text import build_tokenizer, tokenizer_for
from ..errors import MmvsslError

FORMAT = "mmvssl-features/1"
# spaces per modality for heads that do not list their own (MMV's FAC: audio reaches vat via va)
FAC_SPACES = {"video": ("va", "vat"), "audio": ("va", "vat"), "text": ("vat",)}


@dataclass
class ExtractOptions:
    num_clips: int = 1
    num_crops: int = 1
    batch_size: int = 16
    num_workers: int = 0
    limits: MemberLimits | None = None  # the largest shard member read (--max-member-mb); None: the defaults

    def __post_init__(self):
        if self.num_clips < 1:
            raise MmvsslError(f"--clips must be at least 1, got {self.num_clips}")
        if self.num_crops not in (1, 3):
            raise MmvsslError(f"--crops must be 1 (centre) or 3 (two ends and centre), got {self.num_crops}")


def eval_spec(model) -> SampleSpec:
    """Sample as the model was trained (its config.json's `sampling`); an imported model records its
    source's frames, rate, size and audio rate there too (mmvssl/models/imported)."""
    video_cfg, text_cfg = model.config.get("video", {}), model.config.get("text", {})
    sampling = model.config.get("sampling", {})
    return SampleSpec(num_frames=sampling.get("num_frames", video_cfg.get("num_frames", 8)),
                      fps=sampling.get("fps", 4.0), size=sampling.get("size", video_cfg.get("image_size", 224)),
                      audio_rate=sampling.get("audio_rate", 16000),
                      context_length=text_cfg.get("context_length", 77), num_candidates=1, train=False)


def model_spaces(model) -> dict[str, tuple[str, ...]]:
    spaces = getattr(model.heads, "spaces", FAC_SPACES)
    return {m: tuple(spaces.get(m, ())) for m in model.encoders}


def model_fingerprint(model) -> str:
    """sha256 of the config and every weight: equal iff the same model, however it was loaded."""
    h = hashlib.sha256(json.dumps(model.config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_info(model, path: str | None = None) -> dict:
    return {"name": model.name, "path": str(path) if path else None, "fingerprint": model_fingerprint(model)}


def sample_captions(meta: dict) -> list[str]:
    """Every caption of a sample: `captions` (a list, MSR-VTT style) or else `caption`."""
    many = meta.get("captions")
    if isinstance(many, list):
        texts = [str(c).strip() for c in many if str(c).strip()]
        if texts:
            return texts
    one = meta.get("caption")
    return [one.strip()] if isinstance(one, str) and one.strip() else []


def _crops(frames: torch.Tensor, size: int, num_crops: int) -> torch.Tensor:
    """(3, T, H, W) resized to short side `size` -> (num_crops, 3, T, size, size) along the long side."""
    _, _, h, w = frames.shape
    if num_crops == 1:
        top, left = (h - size) // 2, (w - size) // 2
        return frames[None, :, :, top:top + size, left:left + size]
    offsets = [0, (max(h, w) - size) // 2, max(h, w) - size]
    if w >= h:
        return torch.stack([frames[:, :, (h - size) // 2:(h - size) // 2 + size, o:o + size] for o in offsets])
    return torch.stack([frames[:, :, o:o + size, (w - size) // 2:(w - size) // 2 + size] for o in offsets])


class DecodeViews:
    """Pipeline stage: raw tar sample -> every clip x crop of its video, its audio per clip, its captions."""

    def __init__(self, spec: SampleSpec, options: ExtractOptions, tokenizer=None):
        self.spec, self.options = spec, options
        self.tokenizer = tokenizer or build_tokenizer("clip-bpe", spec.context_length)

    def __call__(self, src):
        for raw in src:
            try:
                yield self.decode(raw)
            except (DecodeError, ValueError, KeyError, json.JSONDecodeError):
                yield {"failed": raw.get("__key__", "?")}

    def decode(self, raw: dict) -> dict:
        spec, opt = self.spec, self.options
        data = video_bytes(raw)
        meta = metadata(raw, with_caption=True)
        duration = float(meta.get("duration") or 0.0) or probe(data, check_decode=False).duration
        videos, audios, has_audio = [], [], True
        for start in uniform_windows(duration, spec.window, opt.num_clips):
            if opt.num_crops == 1:
                clip = decode_window(data, start, spec.num_frames, spec.fps, spec.size, spec.audio_rate)
            else:
                clip = decode_window(data, start, spec.num_frames, spec.fps, None, spec.audio_rate,
                                     short_side=spec.size)
            videos.append(_crops(frames_to_tensor(clip.frames), spec.size, opt.num_crops))
            has_audio = has_audio and clip.audio is not None
            audios.append(torch.from_numpy(clip.audio) if clip.audio is not None else torch.zeros(spec.audio_samples))
        captions = sample_captions(meta)
        return {"key": raw["__key__"], "video": torch.cat(videos), "audio": torch.stack(audios),  # (V,3,T,H,W), (C,S)
                "has_audio": has_audio, "captions": captions,
                "tokens": self.tokenizer(captions) if captions else torch.zeros(0, spec.context_length, dtype=torch.long),
                "meta": meta, "source": raw.get("__url__")}


def _batches(src, batch_size: int):
    batch, failed = [], 0
    for sample in src:
        if "failed" in sample:
            failed += 1
            continue
        batch.append(sample)
        if len(batch) == batch_size:
            yield {"samples": batch, "failed": failed}
            batch, failed = [], 0
    if batch or failed:
        yield {"samples": batch, "failed": failed}


@torch.no_grad()
def embed_modality(model, modality: str, x: torch.Tensor, spaces) -> dict:
    """(B, ...) input of one modality -> its pooled encoder output (B, width) and an L2-normalised
    (B, D) embedding per space (`<modality>_<space>`); the search index embeds windows with it too."""
    pooled = model.encoders[modality](x)["pooled"]
    out = {f"{modality}_pooled": pooled}
    for space in spaces:
        out[f"{modality}_{space}"] = F.normalize(model.heads.project(modality, pooled, space), dim=-1)
    return out


def _mean_views(out: dict, batch: int, views: int) -> dict:
    """(B * V, D) -> (B, D): mean over views; embeddings (not pooled features) re-normalised."""
    merged = {}
    for name, x in out.items():
        m = x.view(batch, views, -1).mean(dim=1)
        merged[name] = m if name.endswith("_pooled") else F.normalize(m, dim=-1)
    return merged


@torch.no_grad()
def extract_features(model, shards: str, options: ExtractOptions | None = None, spec: SampleSpec | None = None,
                     model_path: str | None = None, limits: MemberLimits | None = None) -> dict:
    """The feature set of every sample of `shards` (module docstring). Members over `limits` are
    refused from their tar header (shardio.tar_stage), reported on one line and their samples
    counted in `failed`; the rest of the shard is still read."""
    options = options or ExtractOptions()
    spec = spec or eval_spec(model)
    model.eval()
    spaces = model_spaces(model)
    decode = DecodeViews(spec, options, tokenizer_for(model, spec.context_length))  # an imported model's own tokenizer
    pipeline = wds.DataPipeline(wds.SimpleShardList(list_shards(shards)), wds.split_by_worker,
                                tar_stage(skip_unreadable_shard, limits or options.limits), decode,
                                lambda src: _batches(src, options.batch_size))
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=options.num_workers)
    feats: dict[str, list[torch.Tensor]] = {}
    fs = {"keys": [], "captions": [], "labels": [], "sources": [], "metas": [], "text_captions": [],
          "text_owner": [], "has_audio": [], "has_text": [], "failed": 0}
    for item in loader:
        fs["failed"] += item["failed"]
        samples = item["samples"]
        if not samples:
            continue
        B = len(samples)
        out = {}
        if "video" in model.encoders:
            video = torch.cat([s["video"] for s in samples])  # (B * V, 3, T, H, W)
            out.update(_mean_views(embed_modality(model, "video", video, spaces["video"]), B, video.shape[0] // B))
        if "audio" in model.encoders:
            audio = torch.cat([s["audio"] for s in samples])  # (B * C, S)
            out.update(_mean_views(embed_modality(model, "audio", audio, spaces["audio"]), B, audio.shape[0] // B))
        tokens = torch.cat([s["tokens"] for s in samples])
        if "text" in model.encoders and len(tokens):
            out.update(embed_modality(model, "text", tokens, spaces["text"]))  # (M, D), one row per caption
        for name, x in out.items():
            feats.setdefault(name, []).append(x)
        for s in samples:
            n = len(fs["keys"])
            fs["keys"].append(s["key"])
            fs["captions"].append(s["captions"][0] if s["captions"] else "")
            fs["labels"].append(s["meta"].get("label"))
            fs["sources"].append(s["source"])
            fs["metas"].append({k: v for k, v in s["meta"].items() if isinstance(v, (str, int, float, bool))})
            fs["text_captions"] += s["captions"]
            fs["text_owner"] += [n] * len(s["captions"])
            fs["has_audio"].append(s["has_audio"])
            fs["has_text"].append(bool(s["captions"]))
    if not fs["keys"]:
        raise MmvsslError(f"no decodable samples in {shards} ({fs['failed']} failed to decode)")
    fs.update({name: torch.cat(v) for name, v in feats.items()})
    fs["text_owner"] = torch.tensor(fs["text_owner"], dtype=torch.long)
    fs["has_audio"] = torch.tensor(fs["has_audio"], dtype=torch.bool)
    fs["has_text"] = torch.tensor(fs["has_text"], dtype=torch.bool)
    fs["info"] = {"format": FORMAT, "model": model_info(model, model_path), "data": str(shards),
                  "sampling": {"num_frames": spec.num_frames, "fps": spec.fps, "size": spec.size,
                               "audio_rate": spec.audio_rate, "context_length": spec.context_length,
                               **asdict(options), "aggregate": "mean"}}
    return fs


# ---- persistence: tensors in safetensors, everything else in a JSON sidecar; no pickle

JSON_FIELDS = ("keys", "captions", "labels", "sources", "metas", "text_captions", "failed", "info")


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_features(features: dict, path: str | Path) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MmvsslError(f"feature file must end in .safetensors: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in features.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(path), metadata={"format": FORMAT})
    sidecar_path(path).write_text(json.dumps({k: features[k] for k in JSON_FIELDS}, indent=1))
    return path


def load_features(path: str | Path) -> dict:
    from safetensors.torch import load_file
    path = Path(path)
    for f in (path, sidecar_path(path)):
        if not f.is_file():
            raise MmvsslError(f"feature file incomplete: {f} is missing (write it with `mmvssl extract`)")
    side = json.loads(sidecar_path(path).read_text())
    if side.get("info", {}).get("format") != FORMAT:
        raise MmvsslError(f"{sidecar_path(path)}: not an mmvssl feature file (format {side.get('info', {}).get('format')!r}, "
                          f"expected {FORMAT!r})")
    features = dict(side)
    features.update(load_file(str(path)))
    return features


def check_same_model(features: dict, model, where: str) -> None:
    """The feature file must come from this very model (same config and weights)."""
    saved = features["info"]["model"]
    mine = model_fingerprint(model)
    if saved["fingerprint"] != mine:
        raise MmvsslError(f"feature file {where} was extracted with another model: '{saved['name']}' "
                          f"({saved.get('path')}, fingerprint {saved['fingerprint']}), not '{model.name}' "
                          f"(fingerprint {mine}); re-run `mmvssl extract` with this model")


def is_feature_file(spec: str) -> bool:
    return str(spec).endswith(".safetensors")


def data_name(data) -> str:
    """How to name `data` in messages: the path, or for an in-memory feature set its source."""
    return data["info"]["data"] if isinstance(data, dict) else str(data)


def features_for(model, data, options: ExtractOptions | None = None, model_path: str | None = None) -> dict:
    """Features of `data`: a feature set already in memory or a feature file (both checked against
    the model), or shards (extracted now)."""
    if isinstance(data, dict):
        check_same_model(data, model, data_name(data))
        return data
    if is_feature_file(data):
        features = load_features(data)
        check_same_model(features, model, data)
        return features
    return extract_features(model, data, options, model_path=model_path)


def require(features: dict, name: str, where: str, need: str) -> torch.Tensor:
    """The tensor `name`, or an error naming what the data or model lacks."""
    if name not in features:
        have = ", ".join(k for k, v in features.items() if isinstance(v, torch.Tensor) and v.ndim == 2)
        raise MmvsslError(f"{need} needs '{name}' embeddings, which {where} does not have (it has: {have})")
    modality = name.split("_")[0]
    if modality == "audio" and not bool(features["has_audio"].any()):
        raise MmvsslError(f"{need} needs audio, but no sample in {where} has an audio track")
    if modality == "text" and not bool(features["has_text"].any()):
        raise MmvsslError(f"{need} needs text, but no sample in {where} has a caption")
    return features[name]
