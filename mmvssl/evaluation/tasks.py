"""Evaluation tasks: class names, prompt templates and protocols, read from eval/tasks/*.yaml.

A task file:

    name: ucf101
    modality: video            # which embedding is classified: video or audio
    classes: [ApplyEyeMakeup, ...]   # as the labels are written in the shards' metadata
    templates: ["a video of a person {}."]
    label_key: label           # metadata key holding the label (default: label)
    protocols: [zeroshot, linear, knn]   # what `mmvssl eval suite` runs
    data: {train: SHARDS, test: SHARDS}  # optional default shards for the suite
    splits:                    # optional official splits / folds inside one shard set (splits.py):
      - {name: split1, key: split1, train: train, test: test}   # each run, then the mean reported
    relevancy: FILE.npz        # optional EK-100 MIR relevancy for the retrieval protocol

A task whose protocols are only `retrieval` needs no classes.

Labels are matched to class names exactly as written; prompts use a readable form of the name
(`ApplyEyeMakeup` -> `apply eye makeup`, `air_drumming` -> `air drumming`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


from ..errors import MmvsslError
from ..resources import data_path, read_yaml_mapping
from .splits import parse_splits

PROTOCOLS = ("zeroshot", "linear", "knn", "retrieval")
DEFAULT_TEMPLATES = ["a video of {}.", "a photo of {}.", "{}."]


@dataclass
class Task:
    name: str
    classes: list[str]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    modality: str = "video"
    label_key: str = "label"
    protocols: list[str] = field(default_factory=lambda: ["zeroshot", "linear", "knn"])
    data: dict = field(default_factory=dict)
    source: str = "<inline>"
    splits: list = field(default_factory=list)  # splits.Split
    relevancy: str | None = None


def prompt_name(name: str) -> str:
    """A class name as words for a prompt: CamelCase and snake_case split, lower-cased."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return re.sub(r"[_\s]+", " ", words).strip().lower()


def resolve_task_path(name_or_path: str) -> Path:
    """A path to a YAML file, or a task name shipped in eval/tasks/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = data_path("eval", "tasks", f"{name_or_path}.yaml")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in data_path("eval", "tasks").glob("*.yaml")))
    raise MmvsslError(f"task not found: {name_or_path} (a YAML file, or one of: {known})")


def read_class_file(path: str | Path) -> list[str]:
    """Class names from a text file (one per line; an optional leading index is dropped, as in
    UCF101's classInd.txt) or from a YAML task file's `classes`."""
    path = Path(path)
    if not path.is_file():
        raise MmvsslError(f"class file not found: {path}")
    if path.suffix in (".yaml", ".yml"):
        return load_task(path).classes
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            names.append(re.sub(r"^\d+[\s,]+", "", line) if re.match(r"^\d+[\s,]+\S", line) else line)
    return _check_classes(names, str(path))


def _check_classes(names, where: str) -> list[str]:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise MmvsslError(f"{where}: classes must be a non-empty list of names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MmvsslError(f"{where}: duplicate class names {dupes[:5]}")
    return list(names)


def load_task(name_or_path: str | Path) -> Task:
    path = resolve_task_path(str(name_or_path))
    raw = read_yaml_mapping(path, "a task")
    known = {"name", "classes", "classes_file", "templates", "modality", "label_key", "protocols", "data",
             "description", "source", "splits", "relevancy"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MmvsslError(f"{path}: unknown key '{unknown[0]}' (expected: {', '.join(sorted(known))})")
    retrieval_only = set(raw.get("protocols") or []) == {"retrieval"}
    if "classes_file" in raw:
        classes = read_class_file(path.parent / raw["classes_file"])
    elif retrieval_only and not raw.get("classes"):
        classes = []
    else:
        classes = _check_classes(raw.get("classes"), str(path))
    templates = raw.get("templates", DEFAULT_TEMPLATES)
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise MmvsslError(f"{path}: every template needs a '{{}}' for the class name, not {bad[0]!r}")
    modality = raw.get("modality", "video")
    if modality not in ("video", "audio"):
        raise MmvsslError(f"{path}: modality must be 'video' or 'audio', not {modality!r}")
    protocols = raw.get("protocols", ["zeroshot", "linear", "knn"])
    for p in protocols:
        if p not in PROTOCOLS:
            raise MmvsslError(f"{path}: unknown protocol '{p}' (expected: {', '.join(PROTOCOLS)})")
    return Task(name=raw.get("name", path.stem), classes=classes, templates=list(templates), modality=modality,
                label_key=raw.get("label_key", "label"), protocols=list(protocols), data=dict(raw.get("data") or {}),
                source=str(path), splits=parse_splits(raw.get("splits"), str(path)), relevancy=raw.get("relevancy"))


def match_labels(labels: list, classes: list[str], where: str, class_source: str, label_key: str = "label") -> list[int]:
    """Class index of every sample's label; names the labels the class list lacks."""
    index = {c: i for i, c in enumerate(classes)}
    missing = [i for i, label in enumerate(labels) if label is None]
    if missing:
        raise MmvsslError(f"{len(missing)} of {len(labels)} samples in {where} have no label in their metadata "
                          f"(expected a '{label_key}' key)")
    unknown = sorted({str(label) for label in labels if str(label) not in index})
    if unknown:
        near = [c for c in classes if c.lower() in {u.lower() for u in unknown}]
        hint = f"; differs only in case from {near[:3]}" if near else ""
        raise MmvsslError(f"the class list ({class_source}, {len(classes)} classes) does not match the labels of "
                          f"{where}: {len(unknown)} label(s) not in it, e.g. {unknown[:5]}{hint}")
    return [index[str(label)] for label in labels]
