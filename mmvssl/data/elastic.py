"""Elastic epochs: `data.mode=epoch` training that reads every sample of an epoch once, on any
number of processes, and resumes on another number of processes.

What a checkpoint keeps is process-count independent: the epoch and, per shard, which of its
samples were consumed (runs of sample positions, `EpochRecord`). On resume the rest of the epoch
(the epoch's sequence of samples -- shards in the epoch's seeded order, samples in tar order --
less the consumed ones) is split again over the processes and workers of the new run
(`EpochSplit`, `ElasticEpoch`), so nothing is read twice and nothing is lost.

Equal steps. DDP needs every process to take the same number of steps, and the contrastive losses
need the same batch size on every process within a step (labels are offset by rank x batch). The
split is therefore made by steps, not by shards: the rest of the epoch is cut into global steps of
`processes x batch_size` samples; a shorter last step gives each process `rest // processes`
samples, and the `rest % processes` (< processes) samples that cannot be shared equally are left
out of this epoch ("min", not padding: padding repeats samples, so a sample would be read twice;
leaving out at most processes - 1 samples a pass is the smaller harm, and they are counted).
Any number of shards works with any number of processes: a share is a run of samples that may
start and end inside a shard, and a process or worker whose share is empty yields nothing.
What the plan cannot foresee (a sample that fails to decode, a truncated shard) can still make the
processes' batches differ at the end: the engine then agrees on each step's batch size with one
all-reduce (min; 0 ends the epoch for all), so no process waits for a step the others never take.

The shard order follows shardio.EpochSamples (seeded per epoch); webdataset's split_by_node /
split_by_worker are not used because they split whole shards (3 shards over 2 processes give 2
and 1: unequal steps, the hang the webdataset + DDP users report) and cannot resume mid-shard.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import webdataset as wds

from ..errors import MmvsslError
from .shardio import EpochSamples, skip_unreadable_shard, tar_samples

Runs = list[list[int]]  # sorted, disjoint [start, end) runs of sample positions inside one shard


def _add_run(runs: Runs, start: int, end: int) -> None:
    """Insert [start, end) into sorted disjoint runs, merging neighbours (in place)."""
    merged = [start, end]
    kept = []
    for a, b in runs:
        if b < merged[0] or a > merged[1]:
            kept.append([a, b])
        else:
            merged = [min(a, merged[0]), max(b, merged[1])]
    kept.append(merged)
    kept.sort()
    runs[:] = kept


class EpochRecord:
    """Which samples of the current epoch were consumed: shard URL -> runs of positions.

    The same record means the same thing whatever the number of processes or workers that read
    the epoch, so it is what a checkpoint keeps (`state()` is plain JSON) and what a resumed run
    splits the rest of the epoch by."""

    def __init__(self, epoch: int = 0, consumed: dict[str, Runs] | None = None):
        self.epoch = epoch
        self.consumed: dict[str, Runs] = {}
        for url, runs in (consumed or {}).items():
            for a, b in runs:
                self.add_run(url, int(a), int(b))

    def add_run(self, url: str, start: int, end: int) -> None:
        if end > start:
            _add_run(self.consumed.setdefault(url, []), start, end)

    def add(self, read: list) -> None:
        """Mark consumed the (shard URL, position) pairs a batch accounts for (`batch["read"]`)."""
        for url, position in read:
            self.add_run(url, int(position), int(position) + 1)

    def merge(self, other: "EpochRecord") -> None:
        for url, runs in other.consumed.items():
            for a, b in runs:
                self.add_run(url, a, b)

    def count(self) -> int:
        return sum(b - a for runs in self.consumed.values() for a, b in runs)

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": {u: [list(r) for r in runs] for u, runs in self.consumed.items()}}

    @classmethod
    def from_state(cls, state: dict | None, where: str = "checkpoint") -> "EpochRecord":
        if not state:
            return cls()
        try:
            return cls(int(state["epoch"]), {str(u): [[int(a), int(b)] for a, b in runs]
                                             for u, runs in state.get("consumed", {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise MmvsslError(f"{where}: the data position ('data' in trainer_state.json) is malformed "
                              f"({type(e).__name__}: {e})") from None

    def check_shards(self, urls: list[str], where: str = "train.resume") -> None:
        """The record must name shards of this run's data.shards: a record of other shards would
        be silently ignored and the epoch read again."""
        unknown = sorted(set(self.consumed) - set(urls))
        if unknown:
            raise MmvsslError(f"{where}: the checkpoint's epoch position names {len(unknown)} shard(s) that are not "
                              f"in data.shards (first: {unknown[0]}); resume with the same data.shards, or start "
                              f"the epoch afresh with data.mode=resampled or a new run")


@dataclass(frozen=True)
class EpochSplit:
    """How the rest of an epoch (`remaining` samples) is shared by `processes` taking batches of
    `batch_size`: every process reads `per_process` samples in `steps` batches, all of
    `batch_size` but maybe the last (`batch_sizes()`); `dropped` (< processes) samples are left out
    of this epoch (the next epoch reads every sample again)."""
    remaining: int
    processes: int
    batch_size: int

    @property
    def _parts(self) -> tuple[int, int, int]:
        full, rest = divmod(self.remaining, self.processes * self.batch_size)
        last, dropped = divmod(rest, self.processes)
        return full, last, dropped

    @property
    def steps(self) -> int:
        full, last, _ = self._parts
        return full + (last > 0)

    @property
    def dropped(self) -> int:
        return self._parts[2]

    @property
    def per_process(self) -> int:
        full, last, _ = self._parts
        return full * self.batch_size + last

    def batch_sizes(self) -> list[int]:
        full, last, _ = self._parts
        return [self.batch_size] * full + ([last] if last else [])

    def worker_counts(self, num_workers: int) -> list[int]:
        """Samples each DataLoader worker of a process reads: DataLoader takes batch k from worker
        k % num_workers, so worker w reads the batches w, w + W, ... (only the last one short)."""
        sizes = self.batch_sizes()
        return [sum(sizes[w::num_workers]) for w in range(num_workers)]


def _take(segments: list[tuple[int, int, int]], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Positions [lo, hi) of the sequence the segments (shard, start, end) make, as segments."""
    out, offset = [], 0
    for i, a, b in segments:
        first, offset = offset, offset + (b - a)
        if offset <= lo or first >= hi:
            continue
        out.append((i, a + max(0, lo - first), a + min(b - a, hi - first)))
    return out


class ElasticEpoch(EpochSamples):
    """Pipeline source for training in data.mode=epoch: this (process, worker)'s share of the rest
    of the epoch (`record`: what was consumed), as raw tar samples, each tagged with its shard
    position (`__shard_index__`) and epoch (`__epoch__`), which the batches carry back
    (`batch["read"]`) so the engine can record what it consumed."""

    def __init__(self, sets, batch_size: int, seed: int = 0, shuffle: bool = True, limits=None,
                 record: EpochRecord | None = None):
        super().__init__(sets, seed=seed, shuffle=shuffle, limits=limits)
        self.batch_size = batch_size
        record = record or EpochRecord()  # a copy: the engine goes on adding to its own
        self.record = EpochRecord(record.epoch, record.consumed)
        self.epoch = self.record.epoch
        self.record.check_shards([url for url, _ in self.items])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.record.epoch:
            self.record = EpochRecord(epoch)
        self.epoch = epoch

    def remaining(self) -> list[tuple[int, int, int]]:
        """The rest of the epoch in its order, as segments (shard index, start, end)."""
        order = list(range(len(self.items)))
        if self.shuffle:  # shardio.EpochSamples's order, so a fresh epoch reads as it always did
            random.Random(f"{self.seed}/epoch/{self.epoch}").shuffle(order)
        segments = []
        for i in order:
            start = 0
            for a, b in self.record.consumed.get(self.items[i][0], []):
                if a > start:
                    segments.append((i, start, min(a, self.sizes[i])))
                start = max(start, b)
            if start < self.sizes[i]:
                segments.append((i, start, self.sizes[i]))
        return [s for s in segments if s[2] > s[1]]

    def split(self, processes: int) -> EpochSplit:
        return EpochSplit(sum(b - a for _, a, b in self.remaining()), processes, self.batch_size)

    def share(self, rank: int, processes: int, worker: int, num_workers: int) -> list[tuple[int, int, int]]:
        """The segments one worker of one process reads: each process a contiguous run of the rest
        of the epoch, cut into its workers' runs by worker_counts."""
        segments = self.remaining()
        split = EpochSplit(sum(b - a for _, a, b in segments), processes, self.batch_size)
        counts = split.worker_counts(num_workers)
        lo = rank * split.per_process + sum(counts[:worker])
        return _take(segments, lo, lo + counts[worker])

    def __iter__(self):
        rank, world, worker, num_workers = wds.utils.pytorch_worker_info()
        segments = self.share(rank, world, worker, num_workers)
        k = 0
        while k < len(segments):  # consecutive segments of one shard: one pass over the tar
            i = segments[k][0]
            wanted = []
            while k < len(segments) and segments[k][0] == i:
                wanted.append(segments[k][1:])
                k += 1
            url, name = self.items[i]
            end = wanted[-1][1]
            for j, raw in enumerate(tar_samples([{"url": url}], skip_unreadable_shard, self.limits)):
                if j >= end:
                    break
                if any(a <= j < b for a, b in wanted):
                    raw["__source__"], raw["__shard_index__"], raw["__epoch__"] = name, j, self.epoch
                    yield raw
