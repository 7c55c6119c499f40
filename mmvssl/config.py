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

from .errors import ConfigError


@dataclass
class DataConfig:
    shards: str = ""  # a folder of .tar shards, a brace pattern, or several joined by ','
    batch_size: int = 16  # per process
    num_workers: int = 2
    num_frames: int = 8
    fps: float = 4.0  # frames per second of the sampled clip: the window is num_frames / fps long
    size: int = 64  # frames are resized (aspect kept, centre/random crop) to size x size
    audio_rate: int = 16000
    context_length: int = 32  # text tokens
    num_candidates: int = 2  # MIL-NCE: the overlapping narration + nearest ones in time
    shuffle_buffer: int = 256
    max_error_rate: float = 0.1  # stop when more than this share of samples fail to decode
    seed: int | None = None  # defaults to train.seed


@dataclass
class ModelConfig:
    preset: str = "vatt-tiny"  # a name in models/ or a path to a preset YAML
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted preset keys, e.g. video.depth: 4


@dataclass
class TermConfig:
    name: str = ""
    loss: str = "nce"  # nce | mil_nce
    inputs: list[str] = field(default_factory=list)  # two embedding names from model.forward
    weight: float = 1.0


@dataclass
class ObjectiveConfig:
    temperature: float = 0.07
    terms: list[TermConfig] = field(default_factory=lambda: [
        TermConfig(name="va_nce", loss="nce", inputs=["video_va", "audio_va"]),
        TermConfig(name="vt_milnce", loss="mil_nce", inputs=["video_vat", "text_vat"]),
    ])


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"
    max_steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    mixed_precision: str = "no"  # no | bf16 | fp16
    resume: str = ""  # "" | latest | a checkpoint folder
    cpu: bool = False  # force CPU even when a GPU is present


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _describe(e: OmegaConfBaseException) -> str:
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{msg} (key '{key}')" if key and key not in msg else msg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> DictConfig:
    """Schema <- YAML file <- `key=value` overrides; every step validated against the schema."""
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
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
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
