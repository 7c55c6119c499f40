"""A raw shard sample: webdataset's dict of member name -> stored bytes (`{"__key__", "__url__",
"mp4": b"...", "json": b"...", "txt": b"..."}`), nothing decoded and nothing unpickled. One home for
the questions every reader of raw samples asks (the loader, evaluation, audit, search, narrate,
rephrase, the shard rewriters): which member is the video, what the metadata say, which members are
stored, and whether the sample is a failed download's record.
"""

from __future__ import annotations

import json
import math
import tarfile
from typing import Iterator

from ..errors import MmvsslError
from .decode import DecodeError

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
# a sample's note that one of its members was refused for its size (shardio.tar_samples); the
# `__` prefix keeps it out of stored_members, so no rewriter copies it
REFUSED = "__refused__"


def sample_key(raw: dict) -> str:
    return str(raw.get("__key__", "?"))


def video_member(raw: dict) -> str | None:
    """The extension of the sample's video member ('mp4', 'webm', ...), None when it has none."""
    return next((e for e in VIDEO_EXTENSIONS if e in raw), None)


def video_bytes(raw: dict) -> bytes:
    """The video member's bytes; DecodeError naming the key when the sample has none."""
    ext = video_member(raw)
    if ext is None and REFUSED in raw:
        raise DecodeError(f"sample {sample_key(raw)}: {raw[REFUSED].decode('utf-8', errors='replace')}")
    if ext is None:
        raise DecodeError(f"sample {sample_key(raw)} has no video member")
    return raw[ext]


# metadata keys the readers compute with, and what they must hold (None counts as absent)
NUMBER_KEYS = ("duration", "fps", "width", "height", "sample_rate")  # finite numbers >= 0
TIMED_TEXT_KEYS = ("narrations", "pseudo_narrations", "paraphrases")  # lists of {start, end, text, ...}


def _finite(value) -> bool:
    """A finite real number, or a string that reads as one ('1.5'; json gives 1e400 as inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return math.isfinite(float(value))
    except (ValueError, OverflowError):
        return False


def metadata_problem(meta: dict) -> str | None:
    """Why the metadata cannot be trained on, or None. The one check of types and finiteness for
    every reader (loader, `shards inspect`, narrate, `shards build`'s captions): numbers in
    NUMBER_KEYS finite and >= 0, `caption` a string, TIMED_TEXT_KEYS lists of objects whose
    `start` / `end` are finite numbers with start <= end and whose `text` is a string."""
    for key in NUMBER_KEYS:
        value = meta.get(key)
        if value is not None and not (_finite(value) and float(value) >= 0):
            return f"key '{key}' is {json.dumps(value)[:40]}, not a finite number >= 0"
    if meta.get("caption") is not None and not isinstance(meta["caption"], str):
        return "key 'caption' is not a string"
    for key in TIMED_TEXT_KEYS:
        items = meta.get(key)
        if items is None:
            continue
        if not isinstance(items, list):
            return f"key '{key}' is {type(items).__name__}, not a list of {{start, end, text}}"
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                return f"{key}[{i}] is {type(item).__name__}, not an object {{start, end, text}}"
            for bound in ("start", "end"):
                if bound in item and not _finite(item[bound]):
                    return f"{key}[{i}].{bound} is {json.dumps(item[bound])[:40]}, not a finite number"
            if "start" in item and "end" in item and float(item["start"]) > float(item["end"]):
                return f"{key}[{i}] starts after it ends ({item['start']} > {item['end']})"
            if "text" in item and not isinstance(item["text"], str):
                return f"{key}[{i}].text is not a string"
    return None


def metadata(raw: dict, with_caption: bool = False) -> dict:
    """The `.json` member as a dict ({} without one); DecodeError naming the key and the reason when
    it is not a JSON object or fails metadata_problem (the loader skips and counts such a sample).
    `with_caption`: a `.txt` member fills a missing `caption`."""
    if REFUSED in raw:  # a member over the size limit (shardio.tar_samples): refused, never read
        raise DecodeError(f"sample {sample_key(raw)}: {raw[REFUSED].decode('utf-8', errors='replace')}")
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DecodeError(f"sample {sample_key(raw)}: metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DecodeError(f"sample {sample_key(raw)}: metadata is not a JSON object")
    problem = metadata_problem(meta)
    if problem:
        raise DecodeError(f"sample {sample_key(raw)}: bad metadata, {problem}")
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


def read_shard(url: str, limits=None) -> Iterator[dict]:
    """The samples of one shard, in order, as member bytes (members over `limits`, a
    shardio.MemberLimits, refused unread: the sample carries REFUSED); MmvsslError naming the shard
    when it is not a readable tar (truncated, or not a tar at all)."""
    from .shardio import tar_samples

    def unreadable(e: Exception) -> bool:
        reason = str(e.args[0] if e.args else e).split(" @ ")[0]
        raise MmvsslError(f"{url}: unreadable shard ({(reason.splitlines() or [type(e).__name__])[0]})") from None
    try:
        yield from tar_samples([{"url": url}], unreadable, limits)
    except (OSError, ValueError, tarfile.TarError) as e:  # a truncated tar, or not a tar
        raise MmvsslError(f"{url}: unreadable shard ({str(e).splitlines()[0]})") from None
