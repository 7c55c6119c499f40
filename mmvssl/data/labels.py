"""Labels for training: which samples are labelled (a fraction chosen by a hash of the sample key),
every label of a shard set read from the metadata alone, and class indices for a batch.

The labelled subset depends on the key, the fraction and a salt only: the same in every run,
process, worker and resume, whatever order the stream takes (TG's and CMPL's 1% / 10% splits are
fixed lists; a hash gives one without shipping a list). Unlabelled samples get label -1.
"""

from __future__ import annotations

import hashlib
import json
import tarfile

import torch
from webdataset.tariterators import base_plus_ext

from ..errors import MmvsslError

UNLABELLED = -1


def is_labelled(key: str, fraction: float, salt: int = 0) -> bool:
    """Whether sample `key` is in the labelled `fraction` (0..1): the first 8 bytes of
    sha256("<salt>/<key>") read as a number in [0, 1) fall below it."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"{salt}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def shard_labels(shards: str, label_key: str = "label") -> dict[str, object]:
    """key -> the metadata label (None when absent) of every sample in `shards`, reading only the
    `.json` members (tar headers are skipped over, videos are never read)."""
    from .shardio import list_shards
    labels: dict[str, object] = {}
    for url in list_shards(shards):
        try:
            with tarfile.open(url, mode="r:") as tar:
                for member in tar:
                    parsed = base_plus_ext(member.name) if member.isfile() else None
                    if parsed is None or parsed[1] != "json" or "/." in f"/{member.name}":
                        continue
                    key = parsed[0]  # as webdataset names the sample
                    try:
                        meta = json.loads(tar.extractfile(member).read())
                    except json.JSONDecodeError as e:
                        raise MmvsslError(f"{url}: {member.name} is not valid JSON ({e})") from None
                    if isinstance(meta, dict) and meta.get("status") not in (None, "success"):
                        continue  # video2dataset's record of a failed download: no sample
                    labels[key] = meta.get(label_key) if isinstance(meta, dict) else None
        except tarfile.TarError as e:
            raise MmvsslError(f"{url}: unreadable tar ({e})") from None
    return labels


def check_labels(shards: str, classes: list[str], class_source: str, label_key: str = "label",
                 fraction: float = 1.0, salt: int = 0) -> dict:
    """Every labelled sample of `shards` has a label in `classes` (evaluation.tasks.match_labels:
    the error names the labels that do not match); returns counts for the log."""
    from ..evaluation.tasks import match_labels
    labels = shard_labels(shards, label_key)
    if not labels:
        raise MmvsslError(f"{shards}: no samples with metadata (.json members) found")
    chosen = {k: v for k, v in labels.items() if is_labelled(k, fraction, salt)}
    match_labels(list(chosen.values()), classes, f"{shards} ({len(chosen)} labelled samples)", class_source,
                 label_key)
    return {"samples": len(labels), "labelled": len(chosen)}


def batch_targets(batch: dict, classes: list[str], label_key: str = "label", fraction: float = 1.0,
                  salt: int = 0) -> torch.Tensor:
    """(B,) class index of each sample of the batch (its `meta[label_key]`), UNLABELLED (-1) for
    samples outside the labelled fraction. A label outside `classes` is an error naming it."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for key, meta in zip(batch["key"], batch["meta"]):
        if not is_labelled(key, fraction, salt):
            out.append(UNLABELLED)
            continue
        label = meta.get(label_key)
        if label is None or str(label) not in index:
            raise MmvsslError(f"sample {key}: label {label!r} (metadata '{label_key}') is not one of the "
                              f"{len(classes)} classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
        out.append(index[str(label)])
    return torch.tensor(out, dtype=torch.long)


def select_labelled(fraction: float, salt: int, labelled: bool):
    """Pipeline stage over raw samples (before decoding): keep the labelled ones (`labelled`) or
    the others, by key; the loader mixes the two streams at `data.labelled_share`."""
    def stage(src):
        for raw in src:
            if is_labelled(raw.get("__key__", ""), fraction, salt) == labelled:
                yield raw
    return stage
