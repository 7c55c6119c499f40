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

Shards are the unit of work: every shard is embedded on its own (a batch never spans two shards)
into a part, and the parts are concatenated in the shard list's order. `extract_to_file` spreads
the shards over the processes of `torchrun` (workshare.Share: shard i to rank i % world), each
part written atomically into a hidden folder beside the output; rank 0 concatenates them after
every process is done, so N processes write the same file as one (same keys in the same order,
the same tensors: each sample is embedded in the same batch, of the same shape, either way). A
killed run keeps its finished parts: the next run with the same model and options redoes only
the shards that have none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds

from .. import fsio
from ..data.decode import DecodeError, decode_window, probe
from ..data.loader import SampleSpec, frames_to_tensor, list_shards
from ..data.rawsample import metadata, video_bytes
from ..data.shardio import MemberLimits, skip_unreadable_shard, tar_samples
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


def _shard_batches(shards, decode: DecodeViews, batch_size: int, limits: MemberLimits | None):
    """Pipeline stage: shards ({"url", "index"}) -> batches of one shard's samples, the shard's
    last one marked "done" (maybe with no samples: an empty or unreadable shard still closes).
    A batch never spans two shards, so how the shards are split over processes and DataLoader
    workers changes no batch: every sample is embedded in the same batch, of the same shape,
    however many processes run (a matmul's floats may depend on its shapes)."""
    for shard in shards:
        batch, failed = [], 0
        for sample in decode(tar_samples([shard], skip_unreadable_shard, limits)):
            if "failed" in sample:
                failed += 1
                continue
            batch.append(sample)
            if len(batch) == batch_size:
                yield {"index": shard["index"], "samples": batch, "failed": failed, "done": False}
                batch, failed = [], 0
        yield {"index": shard["index"], "samples": batch, "failed": failed, "done": True}


@torch.no_grad()
def _embed_samples(model, spaces: dict, samples: list[dict]) -> dict[str, torch.Tensor]:
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
    return out


LIST_FIELDS = ("keys", "captions", "labels", "sources", "metas", "text_captions")


class _PartBuilder:
    """One shard's features, batch by batch (text_owner counts from the shard's first sample)."""

    def __init__(self):
        self.lists = {name: [] for name in LIST_FIELDS}
        self.failed, self.owner, self.has_audio, self.has_text = 0, [], [], []
        self.tensors: dict[str, list[torch.Tensor]] = {}

    def add(self, samples: list[dict], out: dict[str, torch.Tensor], failed: int) -> None:
        self.failed += failed
        for name, x in out.items():
            self.tensors.setdefault(name, []).append(x)
        for s in samples:
            n = len(self.lists["keys"])
            self.lists["keys"].append(s["key"])
            self.lists["captions"].append(s["captions"][0] if s["captions"] else "")
            self.lists["labels"].append(s["meta"].get("label"))
            self.lists["sources"].append(s["source"])
            self.lists["metas"].append({k: v for k, v in s["meta"].items() if isinstance(v, (str, int, float, bool))})
            self.lists["text_captions"] += s["captions"]
            self.owner += [n] * len(s["captions"])
            self.has_audio.append(s["has_audio"])
            self.has_text.append(bool(s["captions"]))

    def finish(self) -> dict:
        """The part: the list fields, `failed`, and tensors (embeddings, text_owner, has_audio, has_text)."""
        return {**self.lists, "failed": self.failed, **{name: torch.cat(v) for name, v in self.tensors.items()},
                "text_owner": torch.tensor(self.owner, dtype=torch.long),
                "has_audio": torch.tensor(self.has_audio, dtype=torch.bool),
                "has_text": torch.tensor(self.has_text, dtype=torch.bool)}


@torch.no_grad()
def shard_parts(model, shards: list[tuple[int, str]], options: ExtractOptions, spec: SampleSpec,
                limits: MemberLimits | None = None):
    """(index, part) for every (index, url) of `shards`, each as its shard is finished (with
    DataLoader workers, not necessarily in order); a part holds its shard's samples in tar order."""
    model.eval()
    spaces = model_spaces(model)
    decode = DecodeViews(spec, options, tokenizer_for(model, spec.context_length))  # an imported model's own tokenizer
    limits = limits or options.limits
    items = [{"url": url, "index": i} for i, url in shards]
    pipeline = wds.DataPipeline(lambda: iter(items), wds.split_by_worker,
                                lambda src: _shard_batches(src, decode, options.batch_size, limits))
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=options.num_workers)
    building: dict[int, _PartBuilder] = {}
    for item in loader:
        part = building.setdefault(item["index"], _PartBuilder())
        samples = item["samples"]
        part.add(samples, _embed_samples(model, spaces, samples) if samples else {}, item["failed"])
        if item["done"]:
            yield item["index"], building.pop(item["index"]).finish()


def merge_parts(parts: list[dict]) -> dict:
    """Parts (shard_parts) in order -> one feature set without `info` (text_owner made global)."""
    fs: dict = {name: [] for name in LIST_FIELDS}
    fs["failed"] = 0
    tensors: dict[str, list[torch.Tensor]] = {"text_owner": [], "has_audio": [], "has_text": []}
    for part in parts:
        offset = len(fs["keys"])
        for name in LIST_FIELDS:
            fs[name] += part[name]
        fs["failed"] += part["failed"]
        for name, x in part.items():
            if isinstance(x, torch.Tensor):
                tensors.setdefault(name, []).append(x + offset if name == "text_owner" else x)
    empty = {"text_owner": torch.long, "has_audio": torch.bool, "has_text": torch.bool}
    fs.update({name: torch.cat(v) if v else torch.zeros(0, dtype=empty[name]) for name, v in tensors.items()})
    return fs


def feature_info(model, shards: str, spec: SampleSpec, options: ExtractOptions, model_path: str | None) -> dict:
    return {"format": FORMAT, "model": model_info(model, model_path), "data": str(shards),
            "sampling": {"num_frames": spec.num_frames, "fps": spec.fps, "size": spec.size,
                         "audio_rate": spec.audio_rate, "context_length": spec.context_length,
                         **asdict(options), "aggregate": "mean"}}


def _no_samples(shards: str, failed: int) -> MmvsslError:
    return MmvsslError(f"no decodable samples in {shards} ({failed} failed to decode)")


@torch.no_grad()
def extract_features(model, shards: str, options: ExtractOptions | None = None, spec: SampleSpec | None = None,
                     model_path: str | None = None, limits: MemberLimits | None = None) -> dict:
    """The feature set of every sample of `shards` (module docstring), in this process. Members over
    `limits` are refused from their tar header (shardio.tar_samples), reported on one line and their
    samples counted in `failed`; the rest of the shard is still read."""
    options = options or ExtractOptions()
    spec = spec or eval_spec(model)
    urls = list_shards(shards)
    parts = dict(shard_parts(model, list(enumerate(urls)), options, spec, limits))
    fs = merge_parts([parts[i] for i in range(len(urls))])
    if not fs["keys"]:
        raise _no_samples(shards, fs["failed"])
    fs["info"] = feature_info(model, shards, spec, options, model_path)
    return fs


# ---- `mmvssl extract` on many processes: one part per shard, rank 0 concatenates

PART_FORMAT = "mmvssl-features-part/1"


def parts_folder(out: Path) -> Path:
    """Where the processes of one `extract --out FILE` put their parts: `.FILE.parts` beside it."""
    return out.parent / f".{out.name}.parts"


def _part_header(url: str, fingerprint: str, spec: SampleSpec, options: ExtractOptions) -> dict:
    """What a part depends on; a part kept from a killed run is reused only if all of it matches.
    A local shard's size and modification time stand for its content."""
    stamp = None
    if os.path.isfile(url):
        st = os.stat(url)
        stamp = [st.st_size, st.st_mtime_ns]
    sampling = {"num_frames": spec.num_frames, "fps": spec.fps, "size": spec.size, "audio_rate": spec.audio_rate,
                "context_length": spec.context_length, **asdict(options)}
    sampling.pop("num_workers")  # changes no number
    return json.loads(json.dumps({"format": PART_FORMAT, "url": url, "stamp": stamp, "model": fingerprint,
                                  "sampling": sampling}))


def _write_part(path: Path, header: dict, part: dict) -> None:
    from safetensors.torch import save
    tensors = {k: v.contiguous() for k, v in part.items() if isinstance(v, torch.Tensor)}
    fields = {k: v for k, v in part.items() if not isinstance(v, torch.Tensor)}
    fsio.atomic_write_bytes(path, save(tensors, metadata={"header": json.dumps(header), "fields": json.dumps(fields)}))


def _read_part(path: Path, header: dict, tensors: bool = True) -> dict | None:
    """The part at `path` if it was written for `header`, else None (missing, or from another
    shard, model or option); without `tensors`, its list fields and `failed` only. Our own file,
    written atomically; read without unpickling."""
    from safetensors import SafetensorError, safe_open
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("header", "null")) != header:
                return None
            part = json.loads(meta["fields"])
            if tensors:
                part.update({name: f.get_tensor(name) for name in f.keys()})
    except (OSError, KeyError, ValueError, SafetensorError):
        return None
    return part


def extract_to_file(model, shards: str, out: str | Path, options: ExtractOptions | None = None,
                    model_path: str | None = None, share=None) -> dict | None:
    """`mmvssl extract`: the feature file of `shards` at `out`, written by the processes of `share`
    (workshare.Share; one process without it). The shards without a finished part are dealt out
    (the j-th to rank j % world), each shard's part written atomically into parts_folder(out) as it
    is finished; after all are done, rank 0 concatenates the parts in the shard list's order (what
    one process reads), writes `out` and its sidecar atomically and removes the parts. So a run
    after a kill (with any number of processes) reuses every part whose header matches
    (_part_header) and redoes only the others. The feature set is returned on rank 0, None on the
    others. `out` must be on a file system every process sees."""
    from ..data.workshare import Share
    share = share or Share()
    options = options or ExtractOptions()
    out = Path(out)
    check_feature_path(out)
    spec = eval_spec(model)
    urls = list_shards(shards)
    folder = parts_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    headers = [_part_header(url, fingerprint, spec, options) for url in urls]
    paths = [folder / f"part-{i:06d}.safetensors" for i in range(len(urls))]
    kept = [_read_part(path, header, tensors=False) for path, header in zip(paths, headers)]
    share.barrier()  # every process has seen the same finished parts before any writes one
    counted = [part for part in kept if part] if share.is_main else []  # kept parts, counted once
    keys, failed = sum(len(part["keys"]) for part in counted), sum(part["failed"] for part in counted)
    todo = share.mine([(i, url) for i, url in enumerate(urls) if kept[i] is None])  # the rest, dealt out
    for i, part in shard_parts(model, todo, options, spec):
        _write_part(paths[i], headers[i], part)
        keys, failed = keys + len(part["keys"]), failed + part["failed"]
    counts = share.gather_objects([keys, failed])  # every process done: all parts written
    if sum(k for k, _ in counts) == 0:
        raise _no_samples(shards, sum(f for _, f in counts))
    if not share.is_main:
        return None
    parts = []
    for i, path in enumerate(paths):
        part = _read_part(path, headers[i])
        if part is None:
            raise MmvsslError(f"{path}: the part of shard {urls[i]} is missing after every process finished "
                              f"(is {out.parent} on a file system all processes see?)")
        parts.append(part)
    fs = merge_parts(parts)
    fs["info"] = feature_info(model, shards, spec, options, model_path)
    save_features(fs, out)
    shutil.rmtree(folder, ignore_errors=True)
    return fs


# ---- persistence: tensors in safetensors, everything else in a JSON sidecar; no pickle

JSON_FIELDS = ("keys", "captions", "labels", "sources", "metas", "text_captions", "failed", "info")


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def check_feature_path(path: Path) -> None:
    if path.suffix != ".safetensors":
        raise MmvsslError(f"feature file must end in .safetensors: {path}")


def save_features(features: dict, path: str | Path) -> Path:
    """The tensors, then the sidecar, each written atomically (fsio)."""
    from safetensors.torch import save
    path = Path(path)
    check_feature_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in features.items() if isinstance(v, torch.Tensor)}
    fsio.atomic_write_bytes(path, save(tensors, metadata={"format": FORMAT}))
    fsio.atomic_write_text(sidecar_path(path), json.dumps({k: features[k] for k in JSON_FIELDS}, indent=1))
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
