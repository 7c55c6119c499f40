"""Labels for training: which samples are labelled (a fraction of each class chosen by a hash of the
sample key), every label of a shard set read from the metadata alone, and class indices for a batch.

The labelled subset of a shard set: per class, the ceil(fraction x n_class) samples whose key hashes
lowest (sha256 of "<salt>/<key>"), so every class keeps at least one label and the share is exact,
as the papers' 1% / 10% splits are per class. It depends on the keys, their labels, the fraction and
the salt only: the same in every run, process, worker and resume, whatever order the stream takes,
and nested (the 1% subset is inside the 10% one). Unlabelled samples get label -1.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile

import torch
from webdataset.tariterators import base_plus_ext

from ..errors import MmvsslError

UNLABELLED = -1


def key_hash(key: str, salt: int = 0) -> float:
    """The first 8 bytes of sha256("<salt>/<key>") as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(f"{salt}/{key}".encode()).digest()[:8], "big") / 2.0 ** 64


def labelled_keys(labels: dict[str, object], fraction: float, salt: int = 0) -> frozenset[str]:
    """key -> label of a shard set -> the labelled keys: per label, the ceil(fraction x count) keys of
    lowest key_hash (samples without a label are never labelled)."""
    by_class: dict[str, list[str]] = {}
    for key, label in labels.items():
        if label is not None:
            by_class.setdefault(str(label), []).append(key)
    chosen = []
    for keys in by_class.values():
        keys.sort(key=lambda k: (key_hash(k, salt), k))
        chosen += keys[:math.ceil(fraction * len(keys))] if fraction < 1 else keys
    return frozenset(chosen)


def shard_labels(shards: str, label_key: str = "label", limits=None) -> dict[str, object]:
    """key -> the metadata label (None when absent) of every sample in `shards`, reading only the
    `.json` members (videos are passed over unread). A member over `limits` (a shardio.MemberLimits)
    is refused from its tar header, on one line, and its sample left out, as the loader skips it."""
    from .shardio import list_shards, read_members

    def is_metadata(name: str) -> bool:
        parsed = base_plus_ext(name)
        return parsed is not None and parsed[1] == "json" and "/." not in f"/{name}"
    labels: dict[str, object] = {}
    for url in list_shards(shards):
        refused = set()
        try:
            for name, data in read_members(url, is_metadata, limits):
                parsed = base_plus_ext(name)
                key = parsed[0] if parsed else name  # as webdataset names the sample
                if data is None:
                    refused.add(key)
                    continue
                try:
                    meta = json.loads(data)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise MmvsslError(f"{url}: {name} is not valid JSON ({e})") from None
                if isinstance(meta, dict) and meta.get("status") not in (None, "success"):
                    continue  # video2dataset's record of a failed download: no sample
                labels[key] = meta.get(label_key) if isinstance(meta, dict) else None
        except (tarfile.TarError, OSError) as e:
            raise MmvsslError(f"{url}: unreadable tar ({e})") from None
        for key in refused:
            labels.pop(key, None)
    return labels


def check_labels(shards: str, classes: list[str], class_source: str, label_key: str = "label",
                 fraction: float = 1.0, salt: int = 0, limits=None) -> frozenset[str]:
    """The labelled keys of `shards` (labelled_keys), after checking that every labelled sample has a
    label in `classes` (evaluation.tasks.match_labels: the error names the labels that do not match).
    `limits`: the loader's shardio.MemberLimits (samples it would refuse are left out here too)."""
    from ..evaluation.tasks import match_labels
    labels = shard_labels(shards, label_key, limits)
    if not labels:
        raise MmvsslError(f"{shards}: no samples with metadata (.json members) found")
    if fraction >= 1:
        match_labels(list(labels.values()), classes, str(shards), class_source, label_key)
    keys = labelled_keys(labels, fraction, salt)
    match_labels([labels[k] for k in sorted(keys)], classes, f"{shards} ({len(keys)} labelled samples)",
                 class_source, label_key)
    return keys


def batch_targets(batch: dict, classes: list[str], label_key: str = "label",
                  labelled: frozenset[str] | None = None) -> torch.Tensor:
    """(B,) class index of each sample of the batch (its `meta[label_key]`), UNLABELLED (-1) for
    samples outside `labelled` (None: every sample is labelled). A label outside `classes` is an
    error naming it."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for key, meta in zip(batch["key"], batch["meta"]):
        if labelled is not None and key not in labelled:
            out.append(UNLABELLED)
            continue
        label = meta.get(label_key)
        if label is None or str(label) not in index:
            raise MmvsslError(f"sample {key}: label {label!r} (metadata '{label_key}') is not one of the "
                              f"{len(classes)} classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
        out.append(index[str(label)])
    return torch.tensor(out, dtype=torch.long)


def select_labelled(keys: frozenset[str], labelled: bool):
    """Pipeline stage over raw samples (before decoding): keep the labelled ones (`labelled`) or
    the others; the loader mixes the two streams at `data.labelled_share`."""
    def stage(src):
        for raw in src:
            if (raw.get("__key__") in keys) == labelled:
                yield raw
    return stage
