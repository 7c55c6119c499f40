"""Official splits and folds inside one feature set: UCF101's and HMDB51's three train/test
splits, ESC-50's five folds. A task lists them (`splits:` in eval/tasks/*.yaml); each names the
metadata key that `mmvssl datasets convert` wrote and the values that put a sample in train or
test. Features are extracted once; every split is a pair of index subsets of them, and the suite
reports each split and the mean over splits, as the papers do."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MmvsslError

# per-sample list fields of a feature set (features.extract_features); text rows are separate
SAMPLE_LISTS = ("keys", "captions", "labels", "sources", "metas")


@dataclass
class Split:
    name: str
    key: str  # metadata key holding the sample's role in this split (`split1`, `fold`)
    train: list[str]  # values of `key` that put a sample in train (compared as strings)
    test: list[str]


def parse_splits(raw, where: str) -> list[Split]:
    """The task file's `splits:` list -> Split objects, with errors that name the entry."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise MmvsslError(f"{where}: splits must be a non-empty list of {{name, key, train, test}}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not {"name", "key", "test"} <= set(item) or set(item) - {"name", "key", "train", "test"}:
            raise MmvsslError(f"{where}: splits[{i}] needs name, key, test (and train), nothing else; got {item!r}")
        values = {}
        for role in ("train", "test"):
            v = item.get(role, [])
            values[role] = [str(x) for x in (v if isinstance(v, list) else [v])]
        if set(values["train"]) & set(values["test"]):
            raise MmvsslError(f"{where}: splits[{i}] ({item['name']}) puts {sorted(set(values['train']) & set(values['test']))} "
                              f"in both train and test")
        out.append(Split(str(item["name"]), str(item["key"]), values["train"], values["test"]))
    return out


def split_indices(features: dict, split: Split, where: str) -> tuple[list[int], list[int]]:
    """Sample indices of the split's train and test parts; a feature set without the key fails
    with a message naming it (the shards were not built from `datasets convert`'s captions)."""
    roles = [str(m.get(split.key)) if isinstance(m, dict) and m.get(split.key) is not None else None
             for m in features["metas"]]
    if all(r is None for r in roles):
        raise MmvsslError(f"{where}: no sample has '{split.key}' in its metadata; build the shards from the captions "
                          f"`mmvssl datasets convert` writes (datasets/README.md)")
    train = [i for i, r in enumerate(roles) if r in split.train]
    test = [i for i, r in enumerate(roles) if r in split.test]
    if not test or (split.train and not train):
        raise MmvsslError(f"{where}: split {split.name} has {len(train)} train and {len(test)} test samples "
                          f"('{split.key}' values seen: {sorted({r for r in roles if r is not None})[:8]})")
    return train, test


def subset_features(features: dict, index: list[int], tag: str) -> dict:
    """The feature set restricted to samples `index` (their captions' text rows follow them)."""
    n = len(features["keys"])
    idx = torch.tensor(index, dtype=torch.long)
    out = {k: v for k, v in features.items()}
    for k in SAMPLE_LISTS:
        if k in features:
            out[k] = [features[k][i] for i in index]
    owner = features.get("text_owner")
    keep_text = None
    if owner is not None:
        new_id = torch.full((n,), -1, dtype=torch.long)
        new_id[idx] = torch.arange(len(index))
        keep_text = (new_id[owner] >= 0).nonzero().flatten()
        out["text_owner"] = new_id[owner[keep_text]]
        out["text_captions"] = [features["text_captions"][j] for j in keep_text.tolist()]
    for k, v in features.items():
        if not isinstance(v, torch.Tensor) or k == "text_owner":
            continue
        if k.startswith("text_") and keep_text is not None:
            out[k] = v[keep_text]
        elif v.shape[:1] == (n,):
            out[k] = v[idx]
    out["info"] = {**features["info"], "data": f"{features['info']['data']} [{tag}]"}
    return out


def mean_over_splits(results: dict[str, dict]) -> dict:
    """The mean of every numeric top-level metric the splits share (top1, top5, ...)."""
    keys = set.intersection(*(set(k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
                              for r in results.values()))
    return {k: sum(r[k] for r in results.values()) / len(results) for k in sorted(keys)}
