"""A raw shard sample: webdataset's dict of member name -> stored bytes (`{"__key__", "__url__",
"mp4": b"...", "json": b"...", "txt": b"..."}`), nothing decoded and nothing unpickled. One home for
the questions every reader of raw samples asks (the loader, evaluation, audit, search, narrate,
rephrase, the shard rewriters): which member is the video, what the metadata say, which members are
stored, and whether the sample is a failed download's record.
"""

from __future__ import annotations

import json
import tarfile
from typing import Iterator

from ..errors import MmvsslError
from .decode import DecodeError

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")


def sample_key(raw: dict) -> str:
    return str(raw.get("__key__", "?"))


def video_member(raw: dict) -> str | None:
    """The extension of the sample's video member ('mp4', 'webm', ...), None when it has none."""
    return next((e for e in VIDEO_EXTENSIONS if e in raw), None)


def video_bytes(raw: dict) -> bytes:
    """The video member's bytes; DecodeError naming the key when the sample has none."""
    ext = video_member(raw)
    if ext is None:
        raise DecodeError(f"sample {sample_key(raw)} has no video member")
    return raw[ext]


def metadata(raw: dict, with_caption: bool = False) -> dict:
    """The `.json` member as a dict ({} without one); DecodeError naming the key when it is not a
    JSON object. `with_caption`: a `.txt` member fills a missing `caption`."""
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DecodeError(f"sample {sample_key(raw)}: metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DecodeError(f"sample {sample_key(raw)}: metadata is not a JSON object")
    if with_caption and "txt" in raw and not meta.get("caption"):
        meta["caption"] = raw["txt"].decode("utf-8", errors="replace").strip()
    return meta


def stored_members(raw: dict) -> dict[str, bytes]:
    """The members as stored (webdataset's `__key__`, `__url__`, ... left out): what a rewriter copies."""
    return {k: v for k, v in raw.items() if not k.startswith("__")}


def is_failed_download(raw: dict) -> bool:
    """video2dataset keeps a `.json` (status, error_message) and no video for URLs it could not fetch."""
    if video_member(raw) is not None:
        return False
    try:
        meta = metadata(raw)
    except DecodeError:
        return False
    return meta.get("status") not in (None, "success")


def read_shard(url: str) -> Iterator[dict]:
    """The samples of one shard, in order, as member bytes; MmvsslError naming the shard when it
    is not a readable tar (truncated, or not a tar at all)."""
    import webdataset as wds
    try:
        yield from wds.WebDataset([url], shardshuffle=False, empty_check=False)
    except (OSError, ValueError, tarfile.TarError) as e:  # a truncated tar, or not a tar
        raise MmvsslError(f"{url}: unreadable shard ({str(e).splitlines()[0]})") from None
