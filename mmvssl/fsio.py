"""Files on disk: writes that are atomic across a crash or a power cut, and paths that must stay
inside a folder.

Atomic means: write a temporary file (or folder) beside the target, fsync its content, rename it
over the target, fsync the directory that holds the name. After a power cut a reader sees the old
version or the new one, never a truncated or empty file. A folder replaces an older one by an
atomic exchange of the two names where the kernel offers it (Linux renameat2 RENAME_EXCHANGE),
else by renaming the old folder aside first; either way the old folder is deleted only once the new
one is in place under the final name.

Containment: every path a user's file names (a captions line's `video`, a recipe's clip id) is
resolved (symlinks followed) and must lie inside the folder it is relative to; `inside()` is the
one rule `shards build`, `index build` and `datasets cut` apply.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename, a new file) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def commit_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """A finished temporary file (written by any writer: a tar, an MP4, a faiss file) into place:
    fsync it, rename it over `path`, fsync the directory."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent))


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing names atomically (Linux renameat2 with RENAME_EXCHANGE); False where the
    kernel, the C library or the filesystem does not offer it. Written by hand: Python's os module
    has no renameat2, and no maintained library wraps it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """A complete temporary folder (same parent as `final`) into place: its content fsynced, then
    swapped with the old folder; the old one is deleted only after the new one has its name."""
    tmp, final = Path(tmp), Path(final)
    _fsync_tree(tmp)
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    if _exchange(tmp, final):
        fsync_dir(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old content
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old", dir=final.parent))
    os.replace(final, old / final.name)  # kept until the new folder has the final name
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_folder(out) as tmp:` write into `tmp`; on success it replaces `out`
    (replace_folder); on an error `out` is left as it was and `tmp` is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
    try:
        yield tmp
        replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """`root / path` resolved (symlinks followed), or None when it leaves `root` (an absolute
    path elsewhere, `..`, a symlink out). The one containment rule for paths that users' files name."""
    base = Path(root).resolve()
    target = (base / path).resolve()
    return target if target.is_relative_to(base) else None


def outside_reason(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """The one-line reason a path is refused by `inside`."""
    text = str(path)
    if Path(text).is_absolute():
        return f"absolute path {text!r} outside {root}"
    if ".." in Path(text).parts:
        return f"path {text!r} leaves {root} ('..')"
    return f"path {text!r} leads outside {root} (a symlink out)"


def stable_safetensors(data: bytes) -> bytes:
    """safetensors bytes with the header's keys sorted. safetensors (Rust) writes `__metadata__`
    from a hash map whose order changes from process to process, so the same tensors and metadata
    give other bytes in another run; no option of the library fixes it, hence this. The header is
    an 8-byte length and JSON padded with spaces: sorting keeps its length, the tensor data is untouched."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > length:
        raise ValueError(f"safetensors header of {length} bytes re-encodes to {len(text)}")
    return data[:8] + text.ljust(length, b" ") + data[8 + length:]
