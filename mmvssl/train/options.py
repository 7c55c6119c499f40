"""The `objective:` and `train:` sections of an experiment config (schema only)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
