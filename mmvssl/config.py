"""Typed experiment configuration: a YAML file merged over the schema, then `key=value` overrides.

The schema is a tree of dataclasses read by OmegaConf, so a misspelt key or a value of the
wrong type fails with a message that names the key and the file. Modules never read this tree
directly: builders turn its sections into plain keyword arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data.options import DataConfig
from .errors import ConfigError
from .narrator.options import NarratorConfig
from .teacher.options import TeacherConfig
from .train.options import ObjectiveConfig, TrainConfig


@dataclass
class MethodConfig:
    name: str = "contrastive"  # mmvssl.methods: contrastive (VATT, MMV, iBoot), narrator, simclr, svt, teg, carl
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options, checked by the method


@dataclass
class ModelConfig:
    preset: str = "vatt-tiny"  # a name in models/ or a path to a preset YAML
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted preset keys, e.g. video.depth: 4
    init_arch: str = ""  # CLIP initialisation (LaViLa): an open_clip model (name or config JSON); empty = off
    init_pretrained: str = ""  # its weights: an open_clip tag, an hf-hub name or a local checkpoint file
    init_towers: list[str] = field(default_factory=lambda: ["video"])  # video and/or text (text needs text.causal)
    init_from: str = ""  # a model folder to start from: trained (same architecture) or imported (models/imported/init_from.py)


@dataclass
class ExperimentConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    narrator: NarratorConfig = field(default_factory=NarratorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


def _describe(e: OmegaConfBaseException) -> str:
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{msg} (key '{key}')" if key and key not in msg else msg


def read_config_file(path: str | os.PathLike, _chain: tuple = ()) -> dict:
    """A config YAML as a dict, merged over the file(s) its `base:` names (a path relative to it, or
    a list of them, merged in order): a method config names the data and model config it starts
    from instead of repeating it. Lists are replaced, mappings merged key by key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (the base of {_chain[-1]})" if _chain else ""))
    if path.resolve() in _chain:
        raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(map(str, _chain))})")
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    bases = loaded.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        merged = _merge(merged, read_config_file(path.parent / base, (*_chain, path.resolve())))
    return _merge(merged, loaded)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> DictConfig:
    """Schema <- YAML file (over its `base:` files) <- `key=value` overrides; every step validated
    against the schema."""
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        loaded = read_config_file(path)
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {_describe(e)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"override: {_describe(e)}") from None
    # YAML 1.1 reads a bare `no` as false, which a string field stores as "False":
    # `train.mixed_precision=no` (the documented value) must stay "no"
    if str(cfg.train.mixed_precision).lower() in ("false", "0"):
        cfg.train.mixed_precision = "no"
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
