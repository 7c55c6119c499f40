"""Shard rewriting: new shards made from a shard set (or a folder of videos), every member copied
byte for byte and some members added or replaced. The one writer behind `narrate --shards-out`,
`rephrase`, `shards add-features` and `shards add-flow` (`shards build`, which makes shards from
videos, has its own numbered writer in shards.py).

Conventions, the same for every rewriter:
- input is read member by member as bytes (rawsample.read_shard; never unpickled, nothing
  decoded but what the caller decodes); output is written with encoder=False (each member
  exactly as given: webdataset's default encoder would gzip a `.gz` member a second time);
- parts: by default each input shard becomes the output shard of the same name; with
  `samples_per_shard` the input stream is cut into `shard-%06d.tar` of that many input samples;
- each output shard is written as `<name>.partial` and renamed when complete; after every shard
  the report (`<report>`: the run's header, e.g. settings and model, and per shard its source,
  samples written, counts, and the samples skipped with their reason) and `sizes.json` are
  rewritten atomically, so a re-run skips finished shards and redoes an interrupted one;
- a folder written with another header (other settings, another model) is refused unless
  `overwrite`, which removes this rewriter's own files only;
- the bytes of a shard depend only on its input and the pass: every tar header has the same
  mtime (TAR_MTIME; webdataset's default is the clock) and safetensors members are written with
  sorted metadata (`fsio.stable_safetensors`, in the members' encoders), so a re-run, or another
  process, writes the same bytes.

Several processes (torchrun; mmvssl/data/workshare.py): the parts not finished before are dealt
out, the j-th to rank j % world (parts cut from a stream are drained by the others, not decoded).
A process records each shard it finishes in its own small JSON file, `.<report>.parts/<name>.json`
beside the shards (atomic, after the shard's rename), so no two processes ever rewrite one file;
at the end (`finish`) the records of every process are gathered and rank 0 writes the report and
`sizes.json`, shards in name order, exactly as one process writes them, and removes the records.
A run that was killed leaves records of the shards it finished; the next run, with any number of
processes, counts them as done and redoes only the others.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds

from ..errors import MmvsslError
from ..fsio import atomic_write_json, commit_file
from .rawsample import read_shard, sample_key, stored_members
from . import remote
from .shardio import absolute_url
from .workshare import Share

TAR_MTIME = 946684800  # 2000-01-01: the fixed mtime of every member written (reproducible bytes)


@dataclass
class Part:
    """One output shard to write: its file name, what it is made from, and its input samples."""
    name: str
    source: str
    samples: Callable[[], Iterator[dict]]


def shard_parts(urls: list[str], samples_per_shard: int | None = None,
                reader: Callable[[str], Iterator[dict]] = read_shard) -> Iterator[Part]:
    """One part per input shard (same name), or `shard-%06d.tar` parts of `samples_per_shard`
    input samples each, cut from the shards read in order. `reader`: a shard's raw samples (by
    default an unreadable shard ends the run with an error naming it)."""
    if not samples_per_shard:
        names = [os.path.basename(u) for u in urls]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise MmvsslError(f"shards from several folders share the names {twice[:3]}: rewrite them per folder")
        for url, name in zip(urls, names):
            yield Part(name, absolute_url(url), lambda url=url: reader(url))
        return
    yield from chunked_parts(itertools.chain.from_iterable(reader(u) for u in urls), samples_per_shard,
                             ",".join(absolute_url(u) for u in urls))


def chunked_parts(samples: Iterable[dict], per_shard: int, source: str) -> Iterator[Part]:
    """`shard-%06d.tar` parts of `per_shard` samples each from one stream. A part must be consumed
    (or skipped by the rewriter, which drains it) before the next one is asked for."""
    if per_shard < 1:
        raise MmvsslError(f"samples per shard must be at least 1, got {per_shard}")
    stream = iter(samples)
    for index in itertools.count():
        head = next(stream, None)
        if head is None:
            return
        chunk = itertools.chain([head], itertools.islice(stream, per_shard - 1))
        yield Part(f"shard-{index:06d}.tar", source, lambda chunk=chunk: chunk)
        for _ in chunk:  # whatever the consumer left (a finished part of a resumed run)
            pass


@dataclass
class OutputShard:
    """The shard being written: `write` a sample (its stored members plus new ones), `skip` one with
    its reason, `count` anything else worth reporting."""
    part: Part
    writer: wds.TarWriter
    result: dict = field(default_factory=dict)

    def write(self, raw: dict, added: dict[str, bytes] | None = None) -> None:
        """The raw sample's members unchanged, plus (or replaced by) `added` (extension -> bytes)."""
        self.writer.write({"__key__": sample_key(raw), **stored_members(raw), **(added or {})})
        self.result["samples"] += 1

    def skip(self, raw_or_key: dict | str, reason: str) -> None:
        key = raw_or_key if isinstance(raw_or_key, str) else sample_key(raw_or_key)
        self.result["skipped"].append({"key": key, "reason": reason})

    def count(self, name: str, n: int = 1) -> None:
        self.result[name] = self.result.get(name, 0) + n


class ShardRewriter:
    """Writes parts into `out_dir` under the conventions of the module docstring.

        rewriter = ShardRewriter(out, "flow_report.json", {"settings": settings}, inputs=urls)
        for context in rewriter.pending(shard_parts(urls)):   # this process's unfinished parts
            with context as shard:          # renamed and recorded when the block ends normally
                for raw in shard.part.samples():
                    shard.write(raw, {"flow.npz": ...})   # or shard.skip(raw, reason)
        report = rewriter.finish()          # every process: the merged report
    """

    def __init__(self, out_dir: str | os.PathLike, report_name: str, header: dict, inputs: Iterable[str] = (),
                 overwrite: bool = False, mismatch: Callable[[dict, dict], str | None] | None = None,
                 command: str = "this command", counts: Iterable[str] = (), share: Share | None = None):
        """`header`: what the report records about the run (settings, model) and what a resumed run
        must match; `mismatch(old, new)` says why an earlier run's header does not (None: it does);
        `counts`: the counters every shard's entry reports (from 0); `share`: this process's place
        among the pass's processes (default: from torchrun's environment, one process without it)."""
        self.share = share or Share.from_env()
        # an s3:// out: written in a local staging folder, each finished shard uploaded (remote.Staging)
        self.staging = remote.Staging(str(out_dir)) if remote.is_remote(out_dir) else None
        self.where = str(out_dir).rstrip("/") if self.staging else Path(out_dir)
        self.out = self.staging.folder if self.staging else Path(out_dir)
        self.report_name, self.header, self.command = report_name, dict(header), command
        self.counts = tuple(counts)
        if (self.where in {u.rpartition("/")[0] for u in inputs} if self.staging
                else self.out.resolve() in {Path(u).resolve().parent for u in inputs if not remote.is_remote(u)}):
            raise MmvsslError(f"--out {self.where} is the input shard folder: write the new shards elsewhere")
        self.mismatch = mismatch or _differs
        self.records = f".{report_name}.parts"  # a process's record of each shard it finished
        self.report = self._prepare(overwrite)
        if not overwrite:  # shards finished by processes of an earlier run that did not get to merge them
            self.report["shards"].update(self._read_records())
        done = (lambda n: n in self.staging.names) if self.staging else (lambda n: (self.out / n).is_file())
        self.done_before = sorted(n for n in self.report["shards"] if done(n))
        self.report["shards"] = {n: self.report["shards"][n] for n in self.done_before}
        self.written: list[str] = []  # shards this process finished in this run
        self.share.barrier()  # rank 0 has cleaned up (partials, --overwrite) before anyone writes

    def _prepare(self, overwrite: bool) -> dict:
        """The report of an earlier run with the same header, or a fresh one."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / self.report_name
        if self.staging:
            self.staging.fetch(self.report_name)
        main = self.share.is_main  # every process reads and checks; only rank 0 removes anything
        for partial in self.out.glob("*.tar.partial") if main else ():  # an interrupted shard is redone
            partial.unlink()
        old = None
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                old = None
            if not (isinstance(old, dict) and isinstance(old.get("shards"), dict)):
                if not overwrite:
                    shown = f"{self.where}/{self.report_name}" if self.staging else path
                    raise MmvsslError(f"{shown} is not a report of {self.command}; pass --overwrite to start afresh, "
                                      f"or choose another folder")
                old = None
        if old is not None and not overwrite:
            why = self.mismatch({k: old.get(k) for k in self.header}, self.header)
            if why:
                raise MmvsslError(f"{self.where} {why}: pass --overwrite to replace it, or choose another folder")
            return old
        if old is not None and main:  # overwrite: our own files only; anything else in the folder is left alone
            for name in old["shards"]:
                (self.out / name).unlink(missing_ok=True)
                if self.staging:
                    self.staging.remove(name)
        if overwrite and main:
            self._remove_records()
        elif (any(n.endswith(".tar") for n in self.staging.names) if self.staging
              else any(self.out.glob("*.tar"))) and not overwrite and not self._read_records():
            raise MmvsslError(f"{self.where} holds shards without a {self.report_name} (nor records of this command's "
                              f"processes); pass --overwrite or choose another folder")
        return {**self.header, "shards": {}}

    def _read_records(self) -> dict:
        """{shard name: its entry} from the records left by the processes of an earlier run."""
        if self.staging:
            folder = f"{self.where}/{self.records}"
            found = [(n, lambda n=n: remote.read_bytes(f"{folder}/{n}")) for n in remote.listing(folder)]
        else:
            found = [(p.name, p.read_bytes) for p in sorted((self.out / self.records).glob("*.json"))]
        entries = {}
        for file_name, read in found:
            if not file_name.endswith(".json") or file_name.startswith("."):
                continue  # a temporary file of an interrupted write
            try:
                record = json.loads(read())
                header, entry = record["header"], record["shard"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: its shard is redone
            if not (isinstance(header, dict) and isinstance(entry, dict) and isinstance(entry.get("samples"), int)):
                continue
            why = self.mismatch({k: header.get(k) for k in self.header}, self.header)
            if why:
                raise MmvsslError(f"{self.where} {why} (a record of {file_name[:-len('.json')]}): pass --overwrite "
                                  f"to replace it, or choose another folder")
            entries[file_name[:-len(".json")]] = entry
        return entries

    def _remove_records(self) -> None:
        if self.staging:
            folder = f"{self.where}/{self.records}"
            for name in remote.listing(folder):
                remote.remove(f"{folder}/{name}")
        shutil.rmtree(self.out / self.records, ignore_errors=True)

    def _assigned(self, parts: Iterable[Part]) -> Iterator[Part]:
        """This process's parts among those not finished before: the j-th such part is rank j % world's."""
        finished = set(self.done_before)
        todo = (p for p in parts if p.name not in finished)
        return (p for j, p in enumerate(todo) if self.share.owns(j))

    def assigned(self, parts: list[Part]) -> list[Part]:
        """The parts of a list this process will write (for a progress total)."""
        return list(self._assigned(parts))

    def pending(self, parts: Iterable[Part]) -> Iterator["_ShardContext"]:
        """A context for every part of this process not finished by an earlier run, in order (the
        others are passed over unread; a stream-cut part is drained by `chunked_parts`)."""
        for part in self._assigned(parts):
            yield _ShardContext(self, part)

    def _finished(self, name: str, result: dict) -> None:
        """A shard is in place: one process rewrites the report; several each write a record."""
        self.report["shards"][name] = result
        self.written.append(name)
        if self.share.world == 1:
            self.save()
            return
        record = self.out / self.records / f"{name}.json"
        record.parent.mkdir(exist_ok=True)
        atomic_write_json(record, {"header": self.header, "shard": result})  # the header: what made it
        if self.staging:  # the shard first, then its record
            self.staging.publish([name])
            remote.upload(record, f"{self.where}/{self.records}/{name}.json")

    def finish(self) -> dict:
        """Gather every process's finished shards; rank 0 writes the report and sizes.json (shards
        in name order, as one process writes them) and removes the records. Every process returns
        the merged report. Call it on every process, after its last shard."""
        mine = {n: self.report["shards"][n] for n in self.written}
        for entries in self.share.gather_objects(mine):
            self.report["shards"].update(entries)
        self.report["shards"] = dict(sorted(self.report["shards"].items()))
        if self.share.is_main:
            self.save()
            self._remove_records()
        self.share.barrier()  # no process returns before the report names every shard
        return self.report

    def save(self) -> None:
        sizes = {name: r["samples"] for name, r in self.report["shards"].items()}
        for name, value in ((self.report_name, self.report), ("sizes.json", sizes)):
            atomic_write_json(self.out / name, value)  # temp, fsync, rename, fsync the folder
        if self.staging:  # the shards, then sizes.json, then the report that names them
            self.staging.publish(list(self.report["shards"]), "sizes.json", self.report_name)

    def totals(self, *names: str) -> dict:
        """The report's counts summed over shards: samples, skipped, and `names`."""
        shards = self.report["shards"].values()
        out = {"samples": sum(r["samples"] for r in shards), "skipped": sum(len(r["skipped"]) for r in shards)}
        out.update({n: sum(r.get(n, 0) for r in shards) for n in names})
        return out


class _ShardContext:
    def __init__(self, rewriter: ShardRewriter, part: Part):
        self.rewriter, self.part = rewriter, part
        self.partial = rewriter.out / (part.name + ".partial")

    def __enter__(self) -> OutputShard:
        # bytes as they are (no re-gzip of .gz), the same mtime in every run
        writer = wds.TarWriter(str(self.partial), encoder=False, mtime=TAR_MTIME)
        result = {"source": self.part.source, "samples": 0, **{n: 0 for n in self.rewriter.counts}, "skipped": []}
        self.shard = OutputShard(self.part, writer, result)
        return self.shard

    def __exit__(self, kind, value, tb) -> bool:
        self.shard.writer.close()
        if kind is not None:  # an error ends the run: the partial shard is not kept
            self.partial.unlink(missing_ok=True)
            return False
        commit_file(self.partial, self.rewriter.out / self.part.name)  # fsync, rename, fsync the folder
        self.rewriter._finished(self.part.name, self.shard.result)
        return False


def _differs(old: dict, new: dict) -> str | None:
    if old != new:
        return f"was written with {json.dumps(old)}; this run asks for {json.dumps(new)}"
    return None
