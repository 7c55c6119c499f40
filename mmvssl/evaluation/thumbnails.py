"""Frame thumbnails of shard samples, for the retrieval examples of a report."""

from __future__ import annotations

import tarfile

from ..data.decode import decode_window
from ..data.rawsample import VIDEO_EXTENSIONS
from ..data.shardio import read_members


def read_videos(sources: dict[str, str]) -> dict[str, bytes]:
    """{key: shard path} -> {key: video bytes}, opening each shard once and reading only the videos
    asked for (shardio.read_members: a member over the size limit is refused from its tar header, on
    one line, and that sample gets no thumbnail)."""
    by_shard: dict[str, set] = {}
    for key, shard in sources.items():
        if shard:
            by_shard.setdefault(shard, set()).add(key)
    out = {}
    for shard, keys in by_shard.items():
        def wanted(name: str, keys=keys) -> bool:
            key, _, ext = name.partition(".")
            return key in keys and ext in VIDEO_EXTENSIONS
        try:
            for name, data in read_members(shard, wanted):
                if data is not None and wanted(name):
                    out[name.partition(".")[0]] = data
        except (OSError, tarfile.TarError):
            continue  # a thumbnail is a nicety: a moved shard leaves a blank, not a failed report
    return out


def middle_frame(video: bytes, duration: float | None = None, size: int = 96):
    """(size, size, 3) uint8 frame from the middle of the video, or None when it cannot decode."""
    try:
        start = max(0.0, (duration or 0.0) / 2)
        return decode_window(video, start, 1, 1.0, size, audio_rate=None).frames[0]
    except Exception:  # noqa: BLE001  any decode failure only drops the picture
        return None
