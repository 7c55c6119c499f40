"""A model joined from parts: BASE (an mmvssl model folder, trained or imported, or a source imported
now) plus towers of released models (`mmvssl models import BASE --video SRC --audio SRC --text SRC`).

How spaces are shared, and why the parts keep their own: an embedding space exists between towers
that were trained together. X-CLIP's text tower and CLAP's text tower are different networks with
different tokenizers, trained against different partners; nothing aligns their outputs, so a text
embedded by one means nothing in the other's space, and no tower of one source can be scored
against a tower of another. So every part keeps its own space(s): BASE's keep their names (`vat`,
`va`, `ssl`, ...), a joined source's towers embed into a space named after the source's kind
(`clap`, `xclip`, `videomae`, ...). What the joined model then serves, e.g. X-CLIP as BASE and
`--audio CLAP`: text -> video in X-CLIP's `vat` (the text query through X-CLIP's text tower, against
the windows' X-CLIP video embeddings), and audio -> video through the windows' own soundtracks in
CLAP's space (the query sound against each window's sound, both through CLAP's audio tower: the
videos that sound like the query). Audio is never compared with pixels: no trained space holds both.

Pairings that cannot share a space are refused with one line: a text tower joined alone (it would
be the only tower of its space), a tower the source lacks, clips sampled differently (one loader
decodes one clip and one soundtrack for every tower), two sources of one kind (their spaces would
take one name), a joined source equal to BASE.

The folder: config.json (`"kind": "combined"`, the parts, the merged spaces, sampling and text
context) and `parts/<name>/`, each part a complete model folder (its own config.json,
model.safetensors, tokenizer, feature extractor, check.json) that `load_model` reads alone too.

Routing: `encoders[m](x)["pooled"]` is the concatenation of the parts' pooled outputs for m (in part
order) and `heads.project(m, pooled, space)` takes the slice of the part owning `space` through that
part's head. Text ids are the parts' own tokenizers' ids side by side, (N, L_1 + L_2 + ...): each
text tower reads its own columns.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError, MmvsslError
from ...fsio import atomic_folder

KIND = "combined"
PARTS_DIR = "parts"
PART_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")  # a part's folder and space name: no path, no '_'
MODALITIES = ("video", "audio", "text")


def _part_context(model) -> int:
    from ...evaluation.features import eval_spec
    return int(eval_spec(model).context_length)


class CombinedTokenizer:
    """list of N strings -> (N, sum of the parts' context lengths): each text part's own ids side by side."""

    def __init__(self, parts: list[tuple[str, object]]):
        self.parts = parts
        self.context_length = sum(int(tok.context_length) for _, tok in parts)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.cat([tok(list(texts)).long() for _, tok in self.parts], dim=-1)


class CombinedTower(nn.Module):
    """One modality over several parts: pooled outputs concatenated, (B, sum of widths). The parts'
    towers are held, not registered (the parts are, once, under `parts`)."""

    def __init__(self, modality: str, members: list[tuple[str, nn.Module, slice | None]]):
        super().__init__()
        self.modality = modality
        object.__setattr__(self, "members", members)  # (part name, part tower, text columns or None)
        self.width = sum(int(t.width) for _, t, _ in members)
        self.offsets, at = {}, 0
        for name, tower, _ in members:
            self.offsets[name] = slice(at, at + int(tower.width))
            at += int(tower.width)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [tower(x if cols is None else x[..., cols])["pooled"] for _, tower, cols in self.members]
        return {"pooled": torch.cat(outs, dim=-1)}


class CombinedHeads(nn.Module):
    """`project(m, pooled, space)`: the slice of the part owning `space`, through that part's head."""

    def __init__(self, model: "CombinedModel"):
        super().__init__()
        object.__setattr__(self, "model", model)
        self.spaces = {m: tuple(s) for m, s in model.config["spaces"].items()}

    def project(self, modality: str, pooled: torch.Tensor, space: str) -> torch.Tensor:
        part, own = self.model.owner(modality, space)
        piece = pooled[..., self.model.encoders[modality].offsets[part]]
        return self.model.parts[part].heads.project(modality, piece, own)


class CombinedModel(nn.Module):
    """Parts behind one model interface (module docstring)."""

    def __init__(self, config: dict, parts: dict[str, nn.Module]):
        super().__init__()
        self.config = json.loads(json.dumps(config))
        self.parts = nn.ModuleDict(parts)
        self.frame_features = self.token_features = False
        self._route = {}  # (modality, space) -> (part, the part's own space)
        text_cols, at = {}, 0
        for p in self.config["parts"]:
            if "text" in p["use"]:
                n = int(p["text_context"])
                text_cols[p["name"]], at = slice(at, at + n), at + n
            for modality, spaces in p["use"].items():
                for own, new in spaces.items():
                    self._route[(modality, new)] = (p["name"], own)
        self.text_cols = text_cols
        self.encoders = nn.ModuleDict()  # holds no parameters: the towers are the parts'
        for modality in MODALITIES:
            members = [(p["name"], self.parts[p["name"]].encoders[modality], text_cols.get(p["name"]) if
                        modality == "text" else None) for p in self.config["parts"] if modality in p["use"]]
            if members:
                self.encoders[modality] = CombinedTower(modality, members)
        self.heads = CombinedHeads(self)

    @property
    def name(self) -> str:
        return self.config.get("name", "<combined>")

    def owner(self, modality: str, space: str) -> tuple[str, str]:
        if (modality, space) not in self._route:
            have = ", ".join(self.config["spaces"].get(modality, ())) or "no space"
            raise ConfigError(f"model '{self.name}' embeds {modality} in {have}, not '{space}'")
        return self._route[(modality, space)]

    def text_tokenizer(self, context_length: int | None = None) -> CombinedTokenizer:
        from ...data.text import tokenizer_for
        total = int(self.config["text"]["context_length"])
        if context_length not in (None, total):
            raise ConfigError(f"model '{self.name}' reads texts as {total} token ids (its parts' context lengths "
                              f"side by side), not {context_length}")
        parts = [(p["name"], tokenizer_for(self.parts[p["name"]], int(p["text_context"])))
                 for p in self.config["parts"] if "text" in p["use"]]
        return CombinedTokenizer(parts)

    def _part_input(self, part: str, modality: str, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.text_cols[part]] if modality == "text" else x

    def _encode(self, modality: str, x: torch.Tensor, space: str, normalize: bool, method: str):
        part, own = self.owner(modality, space)
        return getattr(self.parts[part], method)(self._part_input(part, modality, x), own, normalize=normalize)

    def encode_video(self, video, space: str = "vat", normalize: bool = True):
        return self._encode("video", video, space, normalize, "encode_video")

    def encode_image(self, images, space: str = "vat", normalize: bool = True):
        return self._encode("video", images, space, normalize, "encode_image")

    def encode_audio(self, audio, space: str = "vat", normalize: bool = True):
        return self._encode("audio", audio, space, normalize, "encode_audio")

    def encode_text(self, tokens, space: str = "vat", normalize: bool = True):
        return self._encode("text", tokens, space, normalize, "encode_text")

    @torch.no_grad()
    def output_dims(self) -> dict[str, int]:
        out = {}
        for (modality, new), (part, own) in self._route.items():
            out[f"{modality}_{new}"] = self.parts[part].output_dims()[f"{modality}_{own}"]
        return out

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every part's embeddings of the modalities it serves here, under the joined space names."""
        out = {}
        for p in self.config["parts"]:
            sub = {m: self._part_input(p["name"], m, batch[m]) for m in p["use"] if m in batch}
            got = self.parts[p["name"]](sub)
            for modality, spaces in p["use"].items():
                for own, new in spaces.items():
                    if f"{modality}_{own}" in got:
                        out[f"{modality}_{new}"] = got[f"{modality}_{own}"]
        return out

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps(self.config, indent=2))
            for name, part in self.parts.items():
                part.save_pretrained(tmp / PARTS_DIR / name)
            if (folder / "check.json").is_file():
                (tmp / "check.json").write_bytes((folder / "check.json").read_bytes())


def is_combined(config) -> bool:
    return isinstance(config, dict) and config.get("kind") == KIND


def load_combined(folder: str | Path, config: dict, map_location: str = "cpu") -> CombinedModel:
    from ...fsio import inside
    from ..presets import load_model
    folder = Path(folder)
    parts = {}
    for p in config.get("parts", []):
        name = str(p.get("name", ""))
        if not PART_NAME.match(name) or inside(folder / PARTS_DIR, name) is None:
            raise ConfigError(f"{folder / 'config.json'}: part name {name!r} is not a plain folder name")
        parts[name] = load_model(folder / PARTS_DIR / name, map_location)
        if is_combined(parts[name].config):
            raise ConfigError(f"{folder / PARTS_DIR / name}: a combined model cannot be a part of another")
    if not parts:
        raise ConfigError(f"{folder / 'config.json'}: a combined model with no parts")
    try:
        return CombinedModel(config, parts).eval()
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{folder / 'config.json'}: does not describe its parts ({e})") from None


# ---- joining: BASE + towers of sources

def _kind_name(model) -> str:
    source = model.config.get("source", {})
    return str(source.get("model_type") or source.get("library") or "part").replace("_", "").lower()


def _sampling(model) -> dict:
    s = model.config.get("sampling", {})
    video = model.config.get("video", {})
    return {"num_frames": int(s.get("num_frames", video.get("num_frames", 8))), "fps": float(s.get("fps", 4.0)),
            "size": int(s.get("size", video.get("image_size", 224))), "audio_rate": s.get("audio_rate")}


def _clip(s: dict) -> str:
    return f"{s['num_frames']} frames at {s['fps']:g} fps, {s['size']} px"


def join(base, base_label: str, joined: dict[str, str], import_source, frames_model) -> CombinedModel:
    """BASE (a loaded model) + {modality: SRC}: the combined model (not yet saved). `import_source(src,
    num_frames, fps)` imports a source; `frames_model(src)` says whether it pools frames (any clip)."""
    from .build import is_imported
    if is_combined(base.config):
        raise MmvsslError(f"{base_label}: already a combined model; join towers onto one of its parts "
                          f"({base_label}/{PARTS_DIR}/NAME)")
    by_source: dict[str, list[str]] = {}
    for modality in MODALITIES:
        if joined.get(modality):
            by_source.setdefault(joined[modality], []).append(modality)
    for src, modalities in by_source.items():
        if src == base_label:
            raise MmvsslError(f"--{modalities[0]} {src}: that is BASE itself; its towers are already in the model")
        if modalities == ["text"]:
            raise MmvsslError(f"--text {src}: a text tower alone would be the only tower in {src}'s space (texts "
                              f"embedded by another model's text tower do not align with BASE's towers); give "
                              f"--video or --audio {src} too, so that its text meets its own tower")
    base_s = _sampling(base)
    video_owner = base_s if "video" in base.encoders else None
    audio_rate = base_s["audio_rate"] if "audio" in base.encoders else None
    parts, entries = {"base": base}, [{"name": "base", "from": base_label, "use": {
        m: {s: s for s in base.heads.spaces.get(m, ())} for m in base.encoders if m in MODALITIES}}]
    for src, modalities in by_source.items():
        frames_only = frames_model(src)
        follow = video_owner if frames_only and video_owner else None  # an image model reads any clip
        model = import_source(src, follow["num_frames"] if follow else None, follow["fps"] if follow else None)
        if not is_imported(model.config):
            raise MmvsslError(f"{src}: a joined tower comes from a released model (docs/models.md); a trained "
                              f"mmvssl model joins as BASE")
        lacking = [m for m in modalities if m not in model.encoders]
        if lacking:
            raise MmvsslError(f"--{lacking[0]} {src}: {model.config['source'].get('model_type', 'the source')} has "
                              f"no {lacking[0]} tower (it has {', '.join(model.encoders)})")
        name = _kind_name(model)
        if name in parts:
            raise MmvsslError(f"{src}: a second {name} source; its space would take the name of the first "
                              f"({name}): join one model of each kind")
        s = _sampling(model)
        if "video" in modalities:
            if video_owner is None:
                video_owner = s
            elif (s["num_frames"], s["size"], s["fps"]) != (video_owner["num_frames"], video_owner["size"],
                                                            video_owner["fps"]):
                raise MmvsslError(f"--video {src}: its clips are {_clip(s)}, BASE's are {_clip(video_owner)}; one "
                                  f"loader decodes one clip for every tower (import BASE with --frames/--fps to match)")
        if "audio" in modalities:
            rate = int(model.config["audio"]["sampling_rate"])
            if audio_rate is not None and int(audio_rate) != rate:
                raise MmvsslError(f"--audio {src}: it reads audio at {rate} Hz, BASE at {audio_rate} Hz; one loader "
                                  f"decodes one soundtrack for every audio tower")
            audio_rate = rate
        parts[name] = model
        entries.append({"name": name, "from": src, "use": {m: {own: name for own in model.heads.spaces[m]}
                                                          for m in modalities}})
    sampling = dict(video_owner or base_s)
    sampling = {k: sampling[k] for k in ("num_frames", "fps", "size")}
    if audio_rate is not None:
        sampling["audio_rate"] = int(audio_rate)
    spaces: dict[str, list[str]] = {}
    for e in entries:
        if "text" in e["use"]:
            e["text_context"] = _part_context(parts[e["name"]])
        for modality, names in e["use"].items():
            spaces.setdefault(modality, []).extend(names.values())
    config = {"kind": KIND, "name": "+".join([base.name] + [parts[e["name"]].name for e in entries[1:]]),
              "parts": entries, "spaces": spaces, "sampling": sampling,
              "text": {"context_length": sum(int(e.get("text_context", 0)) for e in entries)}}
    for name, model in parts.items():
        model.config["sampling"] = {**model.config.get("sampling", {}), **{k: v for k, v in sampling.items()
                                    if k != "audio_rate" or "audio" in model.encoders}}
    return CombinedModel(config, parts).eval()


def combined_check(folder: Path, reports: dict[str, dict]) -> dict:
    """check.json of a combined folder: each checked part's report, and the worst difference per modality."""
    worst: dict[str, float] = {}
    for report in reports.values():
        for m in MODALITIES:
            if m in report:
                worst[m] = max(worst.get(m, 0.0), float(report[m]))
    out = {**worst, "passed": all(r["passed"] for r in reports.values()), "parts": reports,
           "compared": "each part from a source against that source (mmvssl/models/imported/check.py)"}
    (folder / "check.json").write_text(json.dumps(out, indent=2))
    return out


__all__ = ["CombinedModel", "is_combined", "join", "load_combined"]
