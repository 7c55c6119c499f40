"""Dataset recipes: a public release's official annotation files -> `captions.jsonl`, split lists
and download lists for `mmvssl shards build` (`mmvssl datasets convert NAME ANNOTATIONS --out DIR`).
One small module per annotation format; RECIPES maps a dataset name to its converter. The
recipes' READMEs (datasets/<name>/) say where the files come from and how to get the videos."""

from __future__ import annotations

from pathlib import Path

from ...errors import MmvsslError
from . import actions, audioset, ego4d, ek100, esc50, howto100m, kinetics, msrvtt, webvid, youcook2
from .common import Conversion, resolve_videos, write_conversion

RECIPES = {
    "howto100m": howto100m.convert, "audioset": audioset.convert, "webvid": webvid.convert,
    "kinetics400": kinetics.convert, "kinetics600": kinetics.convert, "kinetics700": kinetics.convert,
    "ego4d": ego4d.convert, "ucf101": actions.convert_ucf101, "hmdb51": actions.convert_hmdb51,
    "esc50": esc50.convert, "msrvtt": msrvtt.convert, "youcook2": youcook2.convert, "ek100-mir": ek100.convert,
}


def convert_dataset(name: str, annotations: list[str | Path], out: str | Path, videos: str | Path | None = None,
                    relevancy: str | Path | None = None, allow_pickle: bool = False,
                    ego4d_alpha: float | None = None) -> dict:
    """Convert the official annotation files of dataset `name`; write everything to `out`."""
    if name not in RECIPES:
        raise MmvsslError(f"unknown dataset '{name}' (known: {', '.join(sorted(RECIPES))})")
    if relevancy is not None and name != "ek100-mir":
        raise MmvsslError("--relevancy is for ek100-mir only")
    paths = [Path(a) for a in annotations]
    for p in paths:
        if not p.exists():
            raise MmvsslError(f"annotation file not found: {p}")
    conv = Conversion(dataset=name)
    if name == "ek100-mir":
        ek100.convert(paths, conv, relevancy=Path(relevancy) if relevancy else None, allow_pickle=allow_pickle)
    elif name == "ego4d":
        ego4d.convert(paths, conv, alpha=ego4d_alpha)
    else:
        RECIPES[name](paths, conv)
    if name == "ek100-mir":  # `datasets cut` writes clips/<narration_id>.mp4; --videos then finds the clips
        for e in conv.entries:
            e["source_video"], e["video"] = e["video"], f"clips/{e['id']}.mp4"
    resolve_videos(conv, videos)
    return write_conversion(conv, out)
