"""Finding shards and splitting them: shard lists, shard sets with weights, sample counts, the
epoch split over processes and workers, and the seeded weighted mix of several shard sets.

Epoch mode splits *samples*, not shards: the N samples of the (seeded, per-epoch shuffled)
shard list are cut into one contiguous range per global worker slot (rank x DataLoader
worker), so every sample is read exactly once, slots differ by at most one sample, and a
slot only opens the shards its range touches. Shards that do not divide evenly over the
slots (3 shards, 4 slots) therefore neither duplicate samples nor leave a process idle.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import sys
import tarfile
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterator

import webdataset as wds
from torch.utils.data import IterableDataset
from braceexpand import braceexpand

from ..errors import MmvsslError
from . import remote
from .rawsample import REFUSED, VIDEO_EXTENSIONS  # noqa: F401 (VIDEO_EXTENSIONS read from here by older imports)

_reported_shards: set[str] = set()
_reported_members: set[tuple[str, str]] = set()

# members whose whole content is parsed as text (metadata, captions, labels): small
TEXT_MEMBER_SUFFIXES = ("json", "txt", "cls", "cls2", "index", "id")


@dataclass(frozen=True)
class MemberLimits:
    """The largest shard member a reader takes into memory, checked against the tar header before
    a byte of it is read (`data.max_member_mb`, `data.max_text_member_mb`; `--max-member-mb` on the
    shards commands). A 918-byte bzip2 tar can declare a 1 GiB member, a 10 KB sparse tar 2 GiB."""
    max_member_mb: float = 1024.0  # videos and feature members
    max_text_member_mb: float = 16.0  # .json / .txt / .cls members

    def limit(self, name: str) -> tuple[float, str]:
        """(MiB, option name) for the member `name`."""
        suffix = name.rpartition("/")[2].split(".", 1)[-1].lower()
        if suffix in TEXT_MEMBER_SUFFIXES:
            return self.max_text_member_mb, "data.max_text_member_mb"
        return self.max_member_mb, "data.max_member_mb"


def _refusal(name: str, size: int, limits: MemberLimits) -> str | None:
    limit, option = limits.limit(name)
    if size <= limit * 2**20:
        return None
    return f"member {name} is {size / 2**20:.1f} MiB, over {option}={limit:g} (refused unread)"


def report_refused_member(url: str, name: str, reason: str) -> None:
    """One line on stderr, once per member and process."""
    if (url, name) not in _reported_members:
        _reported_members.add((url, name))
        print(f"mmvssl: warning: {url}: {reason}", file=sys.stderr)


def open_shard(url: str):
    """A binary file object of a shard: a local path, an `s3://` or `http(s)://` URL (remote.py,
    through fsspec) or `pipe:COMMAND` (webdataset's gopen). FileNotFoundError when it is missing."""
    if remote.is_remote(url):
        return remote.open_remote(url)
    if remote.is_pipe(url):
        return wds.gopen(url)
    return open(url, "rb")


def _open_shards(src, handler):
    """webdataset's url_opener with remote URLs opened through open_shard (webdataset's own would
    call curl for http and has no s3 scheme)."""
    for sample in src:
        url = sample["url"]
        try:
            yield {**sample, "stream": open_shard(url)}
        except Exception as exn:  # noqa: BLE001 - handed to the handler, as webdataset does
            exn.args = exn.args + (url,)
            if not handler(exn):
                break


def _open_tar(stream) -> tuple[tarfile.TarFile, bool, bool]:
    """(tar, random_access, skippable): a seekable tar is opened for random access, and when it is
    plain (uncompressed) a refused member is passed by a seek; a compressed or streamed tar can
    only be passed by reading (decompressing) the member, so there a refusal ends the shard."""
    if getattr(stream, "seekable", lambda: False)():
        tar = tarfile.open(fileobj=stream, mode="r:*")
        return tar, True, tar.fileobj is stream
    return tarfile.open(fileobj=stream, mode="r|*"), False, False


def _check_end(tar: tarfile.TarFile, stream) -> None:
    """tarfile ends a seekable tar silently where the data stops at or inside a header; a tar
    cut there (an upload or download that stopped) lacks the end-of-archive block: ReadError."""
    stream.seek(tar.offset)
    if len(stream.read(tarfile.BLOCKSIZE)) < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"unexpected end of data at byte {tar.offset} (truncated)")


def _tar_members(stream, url: str, limits: MemberLimits):
    """webdataset's tar_file_iterator with the member size checked from the header first:
    {fname, data} per regular file; a refused member yields {fname: <key>.__refused__, data: reason}."""
    tar, random_access, skippable = _open_tar(stream)
    for info in tar:
        if not info.isreg() or info.name.startswith("__") or "." not in info.name.rpartition("/")[2]:
            continue
        reason = _refusal(info.name, info.size, limits)
        if reason is not None:
            if not skippable:
                reason += "; rest of this compressed or streamed shard skipped (passing it means reading it)"
            report_refused_member(url, info.name, reason)
            key = info.name.rpartition("/")[0] + "/" if "/" in info.name else ""
            key += info.name.rpartition("/")[2].split(".", 1)[0]
            yield {"fname": f"{key}.{REFUSED}", "data": reason.encode()}
            if not skippable:
                break
            continue
        yield {"fname": info.name, "data": tar.extractfile(info).read()}
        if not random_access:
            tar.members = []  # stream mode: keep no headers (random-access mode indexes them)
    else:
        if skippable:
            _check_end(tar, stream)
    tar.close()


class MemberRefused(MmvsslError):
    """A shard member over the size limit, asked for by name (open_member)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


def read_members(url: str, wanted: Callable[[str], bool], limits: MemberLimits | None = None
                 ) -> Iterator[tuple[str, bytes | None]]:
    """(name, bytes) of each regular member of the shard file `url` that `wanted(name)` accepts, in
    tar order, read one at a time; the others are passed over unread (a seek in a plain tar). For
    readers that need a few members rather than whole samples (labels: the .json members; report
    thumbnails: a few videos). A member over `limits`, wanted or not, is never read: it is reported
    on one line and yielded as (name, None), and in a compressed tar it ends the shard, as in
    tar_samples. OSError / tarfile.TarError when `url` is not a readable tar."""
    limits = limits or MemberLimits()
    with open_shard(url) as f:
        tar, _, skippable = _open_tar(f)
        with tar:
            for info in tar:
                if not info.isreg():
                    continue
                reason = _refusal(info.name, info.size, limits)
                if reason is not None:
                    if not skippable:
                        reason += "; rest of this compressed shard skipped (passing it means reading it)"
                    report_refused_member(url, info.name, reason)
                    yield info.name, None
                    if not skippable:
                        return
                elif wanted(info.name):
                    yield info.name, tar.extractfile(info).read()


@contextlib.contextmanager
def open_member(url: str, name: str, limits: MemberLimits | None = None):
    """(file object of the member `name` of the shard file `url`, its size): read from the member's
    offset as far as the caller reads, never whole (the search server's media ranges). KeyError when
    the shard has no regular member of that name; MemberRefused, reported on one line, when it is
    over `limits`; OSError / tarfile.TarError when `url` is not a readable tar."""
    with open_shard(url) as f, tarfile.open(fileobj=f) as tar:
        info = tar.getmember(name)
        if not info.isreg():
            raise KeyError(name)
        reason = _refusal(name, info.size, limits or MemberLimits())
        if reason is not None:
            report_refused_member(url, name, reason)
            raise MemberRefused(url, reason)
        with tar.extractfile(info) as member:
            yield member, info.size


def tar_samples(src, handler=None, limits: MemberLimits | None = None):
    """Pipeline stage like webdataset's tarfile_to_samples (urls -> samples of member bytes),
    every member checked against `limits` from its tar header before it is read. A refused member
    is never read; its sample carries the reason under rawsample.REFUSED (the loader skips and
    counts it, `shards inspect` counts it)."""
    from webdataset.tariterators import group_by_keys
    handler = handler or skip_unreadable_shard
    limits = limits or MemberLimits()

    def files():
        for source in _open_shards(src, handler):
            url = source["url"]
            try:
                for item in _tar_members(source["stream"], url, limits):
                    yield {**item, "__url__": url}
                yield {}  # end of shard: samples of two shards never merge
            except Exception as exn:  # noqa: BLE001 - handed to the handler, as webdataset does
                exn.args = exn.args + (source.get("stream"), url)
                if not handler(exn):
                    break
            finally:
                close = getattr(source["stream"], "close", None)
                if close:
                    close()
    return group_by_keys(files(), handler=handler)


def tar_stage(handler=None, limits: MemberLimits | None = None):
    """tar_samples as a DataPipeline stage."""
    return lambda src: tar_samples(src, handler, limits)


def skipped_shards() -> list[str]:
    """The shards this process reported unreadable (missing, truncated, not a tar) and skipped."""
    return sorted(_reported_shards)


# a folder where every process records the shards it skips (one file per process), named by this
# environment variable so that DataLoader workers, forked or spawned, inherit it: a worker that
# skips shards may yield no sample at all, so its batches cannot be the messenger
SKIPPED_LOG_ENV = "MMVSSL_SKIPPED_SHARDS_LOG"


@contextlib.contextmanager
def skipped_shards_log():
    """Within it, the processes started from this one (DataLoader workers) record the shards they
    skip; yields a function giving every shard skipped so far by this process and those."""
    import tempfile
    previous = os.environ.get(SKIPPED_LOG_ENV)
    with tempfile.TemporaryDirectory(prefix="mmvssl-skipped-") as folder:
        os.environ[SKIPPED_LOG_ENV] = folder

        def read() -> list[str]:
            # only what was recorded while this log was open: _reported_shards holds every shard this
            # process ever reported (an earlier run in the same process: a notebook, the tests)
            urls = set()
            for name in os.listdir(folder):
                with contextlib.suppress(OSError):
                    urls.update(line for line in open(os.path.join(folder, name)).read().splitlines() if line)
            return sorted(urls)
        try:
            yield read
        finally:
            if previous is None:
                os.environ.pop(SKIPPED_LOG_ENV, None)
            else:
                os.environ[SKIPPED_LOG_ENV] = previous


def _record_skipped(url: str) -> None:
    folder = os.environ.get(SKIPPED_LOG_ENV)
    if folder:
        with contextlib.suppress(OSError), open(os.path.join(folder, f"{os.getpid()}.txt"), "a") as f:
            f.write(url + "\n")


def report_unreadable_shard(url: str, reason: str) -> None:
    """One line on stderr, once per shard and process; the stream goes on without the rest of it."""
    if url not in _reported_shards:
        _reported_shards.add(url)
        print(f"mmvssl: warning: skipped unreadable shard {remote.redact(url)}: {' '.join(reason.split())}",
              file=sys.stderr)
    _record_skipped(url)  # every time: a later run in this process counts it again (printed once)


def skip_unreadable_shard(exn: Exception) -> bool:
    """tarfile_to_samples handler: a shard that is not a readable tar (truncated, not a tar at all)
    is reported on one line (webdataset's warn_and_continue warns with a repr on every pass of a
    resampled stream) and skipped."""
    args = exn.args
    url = args[-1] if len(args) > 1 and isinstance(args[-1], str) else "?"  # webdataset appends the url
    reason = str(args[0]).split(" @ ")[0] if args else ""
    if isinstance(exn, FileNotFoundError):  # fsspec's HTTP says FileNotFoundError for every refusal
        status = remote.http_status(exn)
        reason = remote.describe_http_status(status) if status not in (None, 404) else "not found"
    report_unreadable_shard(url, f"{type(exn).__name__}: {reason}" if reason else type(exn).__name__)
    return True


def _list_remote(part: str) -> list[str]:
    """`pipe:` commands and http(s) brace patterns (a query such as `?token=…` kept) as they are; s3
    brace patterns as they are; an s3 glob or bucket prefix (one without `.tar`): its *.tar objects.
    The first s3 and the first http(s) URL are asked for once, so that refused credentials stop the
    command here with one line (a missing shard is reported when read, and skipped)."""
    urls: list[str] = []
    for item in braceexpand(part):
        # an http(s) URL's query is no glob: only its path is looked at
        path = urllib.parse.urlsplit(item).path if item.startswith(("http://", "https://")) else item
        if remote.is_pipe(item):
            urls.append(item)
        elif any(c in path for c in "*?[") or path.endswith("/") or "." not in path.rpartition("/")[2]:
            found = remote.list_prefix(item)
            if not found:
                raise MmvsslError(f"no .tar shards under {item}")
            urls.extend(found)
        else:
            urls.append(item)
    for scheme in (("s3://",), ("http://", "https://")):  # a refused credential stops here, not per shard
        first = next((u for u in urls if u.startswith(scheme)), None)
        if first is not None:
            remote.check_access(first)
    return urls


def absolute_url(url: str, resolve: bool = False) -> str:
    """A local shard's absolute path (symlinks resolved when `resolve`); a URL as it is."""
    if remote.is_remote(url) or remote.is_pipe(url):
        return url
    return os.path.realpath(url) if resolve else os.path.abspath(url)


def list_shards(spec: str) -> list[str]:
    """A folder (its *.tar), a brace pattern, a glob, or several of those joined by ','; remote:
    `s3://bucket/prefix/shard-{000000..000009}.tar`, an s3 bucket prefix (its *.tar),
    `http(s)://host/path/{...}.tar`, `pipe:COMMAND` (remote.py)."""
    urls: list[str] = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        if remote.is_remote(part) or remote.is_pipe(part):
            urls.extend(_list_remote(part))
            continue
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise MmvsslError(f"no .tar shards in folder {part}")
            urls.extend(found)
            continue
        for item in braceexpand(part):
            matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
            for m in matches:
                if not os.path.isfile(m):
                    raise MmvsslError(f"shard not found: {m}")
                urls.append(m)
    if not urls:
        raise MmvsslError(f"no shards found for '{spec}'")
    return urls


@dataclass
class ShardSet:
    name: str
    urls: list[str]
    weight: float = 1.0


def parse_sources(spec: str) -> list[ShardSet]:
    """Shard sets joined by ';', each `[name=]shards[@weight]`, e.g.
    `howto=/d/howto@0.7;audioset=/d/audioset@0.3`. One set without a name is named ''."""
    sets = []
    for i, part in enumerate(p.strip() for p in str(spec).split(";") if p.strip()):
        named = re.match(r"([A-Za-z0-9_.-]+)=", part)  # `name=`, not the `--flag=value` of a pipe: command
        name, rest = (named.group(1), part[named.end():]) if named else ("", part)
        shards, _, weight = rest.rpartition("@") if re.search(r"@[0-9.eE+-]+$", rest) else (rest, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise MmvsslError(f"shard set {i + 1} ('{part}'): weight '{weight}' is not a number") from None
        if w <= 0:
            raise MmvsslError(f"shard set {i + 1} ('{part}'): weight must be > 0")
        sets.append(ShardSet(name or (f"set{i}" if ";" in str(spec) else ""), list_shards(shards), w))
    if not sets:
        raise MmvsslError(f"no shards found for '{spec}'")
    return sets


def _key_of(name: str) -> str:
    """webdataset's grouping key: the path up to the first '.' of the file name."""
    head, _, base = name.rpartition("/")
    return (head + "/" if head else "") + base.split(".", 1)[0]


def shard_size(url: str, limits: MemberLimits | None = None) -> int:
    """Samples in a shard: from sizes.json beside it, else by reading the tar headers (stopping,
    as the readers do, at a member over `limits` in a compressed tar). Remote shards: sizes.json
    beside them, read once per folder; without it they are counted and the user told how to save that."""
    if remote.is_remote(url):
        folder, _, base = url.rpartition("/")
        sizes = remote.read_sizes(folder)
        if sizes is not None and base in sizes:
            return int(sizes[base])
        remote.tell_sizes_missing(folder)
        return count_samples(url, limits)
    if remote.is_pipe(url):
        return count_samples(url, limits)
    sizes_path = os.path.join(os.path.dirname(url), "sizes.json")
    if os.path.isfile(sizes_path):
        try:
            sizes = json.loads(open(sizes_path).read())
            if os.path.basename(url) in sizes:
                return int(sizes[os.path.basename(url)])
        except (json.JSONDecodeError, ValueError, OSError):
            pass
    return count_samples(url, limits)


def count_samples(url: str, limits: MemberLimits | None = None) -> int:
    """Samples in a shard, counted from its tar headers (an unreadable shard is reported on one
    line and counts the samples before the damage)."""
    count, last = 0, None
    limits = limits or MemberLimits()
    try:
        with open_shard(url) as f:
            tar, _, skippable = _open_tar(f)
            for member in tar:
                if not member.isfile():
                    continue
                key = _key_of(member.name)
                if key != last:
                    count, last = count + 1, key
                if not skippable and _refusal(member.name, member.size, limits):
                    break
            else:
                if skippable:
                    _check_end(tar, f)
    except (tarfile.TarError, OSError) as e:  # the samples before the damage still count (and are read)
        report_unreadable_shard(url, f"{type(e).__name__}: {e}")
    return count


def write_sizes(spec: str, limits: MemberLimits | None = None) -> dict[str, dict[str, int]]:
    """Count the samples of every shard of `spec` and write sizes.json beside them (one per folder,
    local or s3://, merged with the one there): {folder: {shard name: samples}}."""
    from ..fsio import atomic_write_json
    by_folder: dict[str, dict[str, int]] = {}
    for url in list_shards(spec):
        if remote.is_pipe(url) or url.startswith(("http://", "https://")):
            raise MmvsslError(f"{url}: sizes.json can be written beside local or s3:// shards only; "
                              f"write it where the server's files are")
        folder, _, base = url.rpartition("/") if remote.is_remote(url) else (os.path.dirname(url), "", os.path.basename(url))
        by_folder.setdefault(folder, {})[base] = count_samples(url, limits)
    for folder, sizes in by_folder.items():
        if remote.is_remote(folder):
            merged = {**(remote.read_sizes(folder) or {}), **sizes}
            remote.upload_bytes(json.dumps(merged, indent=1, sort_keys=True).encode(), f"{folder}/sizes.json")
            remote.forget_sizes(folder)
        else:
            path = os.path.join(folder, "sizes.json")
            try:
                old = json.loads(open(path).read()) if os.path.isfile(path) else {}
            except (json.JSONDecodeError, OSError):
                old = {}
            atomic_write_json(path, {**(old if isinstance(old, dict) else {}), **sizes})
    return by_folder


def slot_range(total: int, slot: int, num_slots: int) -> tuple[int, int]:
    """The contiguous share [lo, hi) of `total` samples that one of `num_slots` slots reads."""
    return total * slot // num_slots, total * (slot + 1) // num_slots


class EpochSamples(IterableDataset):
    """Pipeline source: this slot's share of one epoch, as raw tar samples (never decoded here).

    `set_epoch(e)` before creating the DataLoader iterator changes the seeded shard order."""

    def __init__(self, sets: list[ShardSet], seed: int = 0, shuffle: bool = False,
                 limits: MemberLimits | None = None):
        self.items = [(url, s.name) for s in sets for url in s.urls]
        self.limits = limits or MemberLimits()
        self.sizes = [shard_size(url, self.limits) for url, _ in self.items]
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.sizes)

    def __iter__(self):
        rank, world, worker, num_workers = wds.utils.pytorch_worker_info()
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(f"{self.seed}/epoch/{self.epoch}").shuffle(order)
        lo, hi = slot_range(sum(self.sizes), rank * num_workers + worker, world * num_workers)
        offset = 0
        for i in order:
            url, name = self.items[i]
            first, offset = offset, offset + self.sizes[i]
            if offset <= lo or first >= hi:
                continue  # outside this slot's range: never opened
            for j, raw in enumerate(tar_samples([{"url": url}], skip_unreadable_shard, self.limits)):
                if lo <= first + j < hi:
                    raw["__source__"] = name
                    yield raw
                elif first + j >= hi:
                    break


def tag_source(name: str):
    """Pipeline stage: mark each raw sample with the shard set it came from."""
    def stage(src):
        for raw in src:
            raw["__source__"] = name
            yield raw
    return stage


def mix(streams: list, weights: list[float], rng: random.Random):
    """Seeded weighted interleave of endless streams (one draw per sample)."""
    iterators = [iter(s) for s in streams]
    while True:
        i = rng.choices(range(len(iterators)), weights=weights)[0]
        yield next(iterators[i])
