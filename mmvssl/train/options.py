"""The `objective:` and `train:` sections of an experiment config (schema only)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TermConfig:
    name: str = ""
    loss: str = "nce"  # nce | nt_xent | mil_nce | siglip | ssl_clip | distill_frames | distill_clip | model
    inputs: list[str] = field(default_factory=list)  # two embedding names from model.forward (distill: student, teacher)
    weight: float = 1.0
    temperature: float | None = None  # None: objective.temperature
    learnable: bool | None = None  # None: objective.learnable_temperature
    bias: float = -10.0  # siglip only: initial logit bias
    generated_temperature: float | None = None  # nce/mil_nce: fixed temperature of pairs whose text is generated
    pseudo_temperature: float | None = None  # ssl_clip only: LaViLa's pseudo-narration temperature; None: temperature
    distance: str = "cosine"  # distill only: cosine (1 - cos, BYOL style) | smooth_l1 (to layer-normed targets)
    predictor_hidden: int = 0  # distill only: hidden width of the predictor MLP; 0: 2 x the teacher's width


@dataclass
class ObjectiveConfig:
    temperature: float = 0.07
    learnable_temperature: bool = False  # learn log(temperature) per term (no weight decay, checkpointed)
    min_temperature: float = 0.01  # learnable temperatures are clamped to [min, max] (CLIP: 1/100)
    max_temperature: float = 1.0
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
    min_lr_ratio: float = 0.0  # the cosine ends at min_lr_ratio x lr (VATT: 5e-5 / 1e-4 = 0.5)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW's (beta1, beta2)
    eps: float = 1e-6  # AdamW's epsilon
    grad_clip: float = 1.0  # 0: no clipping (the gradient norm is still checked for NaN/inf)
    seed: int = 0
    log_every: int = 10
    save_every: int = 500  # a checkpoint every N steps (0: only at the end)
    keep_last: int = 2
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 with dynamic loss scaling)
    resume: str = ""  # "" | latest | a checkpoint folder
    cpu: bool = False  # force CPU even when a GPU is present
    accum_steps: int = 1  # >1: split each batch in micro-batches, keeping every negative (feature cache)
    max_bad_steps: int = 5  # stop after this many consecutive steps with a non-finite loss or gradient
    ema_decay: float = 0.0  # >0: keep an EMA of the weights (saved to OUTPUT/model_ema)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute transformer blocks in backward (less memory)
    find_unused_parameters: bool = False  # DDP: set when the objective leaves some heads/encoders unused
    log_with: str = "tensorboard"  # accelerate tracker(s), comma-separated; "none" for metrics.jsonl only
