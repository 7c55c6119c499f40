"""`supervised`: a classifier head on a (pretrained) video encoder trained with labels: fine-tuning
(`mmvssl finetune`, configs/finetune/) and the supervised-only baseline of the few-label tables.

The fine-tuning recipe of the papers mmvssl follows (VATT, MMV and CVRL fine-tune end to end;
the details are VideoMAE's / BEiT's, which VATT-style transformers use): cross-entropy with label
smoothing, mixup and cutmix on the clips (timm's Mixup: one of the two per batch, the batch mixed
with its reverse), layer-wise learning-rate decay (the head at lr, each transformer block below
it at `layer_decay` times the one above, the embeddings last), dropout before the head, and
multi-clip multi-crop testing (evaluation/classifier.py).

The classifier (models/classifier.py) is what is saved: the encoder's model folder plus the head.
Labels are the task's classes matched to each sample's metadata as the evaluation matches them
(every labelled training sample is checked before the first step: an unknown label stops the run
with the labels that do not match). With `data.labelled_fraction` < 1 only that fraction of each
class (by a hash of the key, mmvssl.data.labels) keeps its label; the others are dropped from the
batch here (`data.labelled_share: 1` makes the loader draw only labelled samples). With
`val_shards` the classifier is scored every `eval_every` steps and at the end, and the best by val
top-1 is kept in `<output_dir>/best` (best.json says its step and score).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..data.labels import UNLABELLED, batch_targets, check_labels
from ..errors import ConfigError
from .base import BuildContext, Method


@dataclass
class SupervisedOptions:
    task: str = ""  # eval/tasks/X.yaml or a shipped task name: the classes and the label key
    pretrained: str = ""  # a model folder to start from; empty: model.preset at random initialisation
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Beta(alpha, alpha) of mixup; 0: off (VideoMAE: 0.8)
    cutmix: float = 1.0  # Beta(alpha, alpha) of cutmix; 0: off (VideoMAE: 1.0)
    mix_prob: float = 1.0  # share of batches mixed at all
    switch_prob: float = 0.5  # when both are on: share of mixed batches that use cutmix
    layer_decay: float = 0.75  # layer-wise lr decay; 1: every layer at train.lr
    dropout: float = 0.0  # before the head
    val_shards: str = ""  # scored every eval_every steps and at the end; the best is kept
    eval_every: int = 0  # 0: only at the end
    eval_clips: int = 1  # views per video when scoring val (the final test takes the command's)
    eval_crops: int = 1


# ---- pure parts: the loss, the mixing, the layer of a parameter


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_c targets[c] * log_softmax(logits)[c]; logits (N, C), targets (N, C)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(N,) class indices -> (N, C): 1 - smoothing + smoothing / C on the class, smoothing / C elsewhere."""
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None) -> tuple[int, ...]:
    """CutMix's box (y0, y1, x0, x1): side ratios sqrt(1 - lam), centre uniform, clipped to the frame."""
    ratio = (1.0 - lam) ** 0.5
    h, w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    return (max(cy - h // 2, 0), min(cy + h // 2, height), max(cx - w // 2, 0), min(cx + w // 2, width))


def mix_batch(video: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float, mix_prob: float = 1.0,
              switch_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mixup or CutMix of a batch of clips (B, C, T, H, W) with the batch reversed (timm's `batch`
    mode); the same box in every frame (temporally consistent), the targets (B, K) mixed by the
    share of pixels each clip keeps. Returns (video, targets, {"lam", "kind"})."""
    if (mixup <= 0 and cutmix <= 0) or float(torch.rand(())) >= mix_prob or video.shape[0] < 2:
        return video, targets, {"lam": 1.0, "kind": "none"}
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand(())) < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    other = video.flip(0)
    if use_cutmix:
        y0, y1, x0, x1 = cutmix_box(video.shape[-2], video.shape[-1], lam)
        video = video.clone()
        video[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (video.shape[-2] * video.shape[-1])
    else:
        video = lam * video + (1.0 - lam) * other
    return video, lam * targets + (1.0 - lam) * targets.flip(0), {"lam": lam, "kind": "cutmix" if use_cutmix else "mixup"}


EMBEDDING_PARTS = ("pos_", "agg_token", "stem", "patch_embed", "in_proj", "token_embed", "conv1", "bn1")


def layer_of(name: str) -> int | None:
    """The depth of a video-encoder parameter for layer-wise lr decay: 0 for embeddings, i + 1 for
    transformer block i (`blocks.i`) or CNN stage i (`layer<i>`), None for what sits above the
    blocks (the final norm, the head: at the full lr)."""
    block = re.search(r"\bblocks\.(\d+)\.", name) or re.search(r"\blayer(\d+)\.", name)
    if block:
        return int(block.group(1)) + (1 if "blocks." in block.group(0) else 0)
    return 0 if any(part in name for part in EMBEDDING_PARTS) else None


def layer_decay_scale(names: list[str], decay: float) -> dict[str, float]:
    """name -> lr multiplier decay ** (L + 1 - layer), L the deepest layer found (BEiT's rule)."""
    layers = {n: layer_of(n) for n in names}
    top = max((v for v in layers.values() if v is not None), default=0) + 1
    return {n: decay ** (top - (top if v is None else v)) for n, v in layers.items()}


# ---- the pieces every label-using method shares (supervised, tg, cmpl)


def task_of(options, method: str):
    from ..evaluation.tasks import load_task
    if not options.task:
        raise ConfigError(f"method.options.task: method '{method}' needs the task whose classes it learns "
                          f"(eval/tasks/X.yaml or a task name)")
    task = load_task(options.task)
    if not task.classes:
        raise ConfigError(f"method.options.task: {task.source} lists no classes")
    return task


def build_classifier(cfg: DictConfig, options, task, dropout: float = 0.0, pretrained: str = ""):
    """The VideoClassifier on `pretrained` (a model folder) or on a fresh `model.preset`; its
    config's `sampling` is this run's, so that evaluation samples as it was trained."""
    from ..models.classifier import VideoClassifier
    from .contrastive import build_student, sampling_of
    if pretrained:
        from ..models.presets import load_model
        if not Path(pretrained).is_dir():
            raise ConfigError(f"method.options.pretrained: {pretrained} is not a model folder")
        backbone = load_model(pretrained)
        backbone.config["sampling"] = sampling_of(cfg)
    else:
        backbone = build_student(cfg)
    return VideoClassifier(backbone, task.classes, task.label_key, task.source, dropout)


def labelled_fraction(cfg: DictConfig) -> tuple[float, int]:
    fraction = float(cfg.data.get("labelled_fraction", 1.0))
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"data.labelled_fraction must be in (0, 1], got {fraction}")
    return fraction, int(cfg.data.get("labelled_seed", 0))


class Validation:
    """Scores the classifier on val shards every `every` steps (and at the last step) on the main
    process, and keeps the best by top-1 in `<out>/best` (atomic, with best.json). The best score
    so far is a buffer of the method, so a resumed run keeps comparing against it."""

    def __init__(self, method: Method, shards: str, every: int, max_steps: int, out, accelerator, clips: int,
                 crops: int):
        self.shards, self.every, self.max_steps = shards, every, max_steps
        self.out, self.accelerator, self.clips, self.crops = Path(out), accelerator, clips, crops
        method.register_buffer("best_top1", torch.tensor(-1.0, dtype=torch.float64))  # as the report
        method.register_buffer("best_step", torch.tensor(0))
        self.method, self.last = method, {}

    def due(self, step: int) -> bool:
        return bool(self.shards) and (step == self.max_steps or (self.every > 0 and step % self.every == 0))

    def __call__(self, classifier, step: int) -> None:
        if not self.due(step) or (self.accelerator is not None and not self.accelerator.is_main_process):
            return
        from ..evaluation.classifier import evaluate_classifier
        from ..evaluation.features import ExtractOptions
        report = evaluate_classifier(classifier, self.shards, None, ExtractOptions(self.clips, self.crops))
        self.last = {"val_top1": report["top1"], "val_top5": report["top5"]}
        line = {"step": step, **self.last}
        with open(self.out / "val.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if report["top1"] > float(self.method.best_top1):
            self.method.best_top1.fill_(report["top1"])
            self.method.best_step.fill_(step)
            classifier.save_pretrained(self.out / "best")
            (self.out / "best.json").write_text(json.dumps({**line, "val": self.shards}, indent=2))
        if self.accelerator is not None:
            self.accelerator.print(f"step {step}: val top1 {report['top1']:.1f} (best {float(self.method.best_top1):.1f} "
                                   f"at step {int(self.method.best_step)})")


def setup_labels(method: Method, cfg: DictConfig, ctx: BuildContext, options, task) -> None:
    """The labelled subset (data.labelled_fraction: the loader draws data.labelled_share of the stream
    from it), the label check over the training shards and the validation of a label-using method."""
    method.classes, method.label_key = task.classes, task.label_key
    fraction, salt = labelled_fraction(cfg)
    from ..data.options import member_limits
    keys = check_labels(cfg.data.shards, task.classes, task.source, task.label_key, fraction, salt,
                        limits=member_limits(cfg.data))  # the labelled set holds only samples the loader reads
    method.labelled = keys if fraction < 1 else None
    if ctx.spec is not None:
        ctx.spec.labelled_keys = method.labelled
    if ctx.accelerator is not None:
        ctx.accelerator.print(f"labels: {len(keys)} training samples labelled (data.labelled_fraction={fraction}, "
                              f"{task.source}, {len(task.classes)} classes)")
    method.validation = Validation(method, options.val_shards, options.eval_every, cfg.train.max_steps, ctx.out,
                                   ctx.accelerator, options.eval_clips, options.eval_crops)


def select_rows(batch: dict, keep: torch.Tensor) -> dict:
    """The batch restricted to the rows `keep` (B,) bool: every per-sample tensor, keys and metas."""
    from ..modalities import PER_SAMPLE_KEYS
    idx = keep.nonzero().flatten().tolist()
    out = dict(batch)
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and (k in PER_SAMPLE_KEYS or k.startswith("video")) and v.shape[:1] == keep.shape:
            out[k] = v[keep]
        elif k in ("key", "meta"):
            out[k] = [v[i] for i in idx]
    return out


def targets_of(method: Method, batch: dict) -> torch.Tensor:
    """(B,) class indices on the batch's device, -1 for unlabelled samples."""
    return batch_targets(batch, method.classes, method.label_key, method.labelled).to(batch["video"].device)


class Supervised(Method):
    name = "supervised"
    paper = "fine-tuning as in VATT (Akbari et al. 2021) / VideoMAE (Tong et al. 2022): LLRD, label smoothing, mixup/cutmix"
    Options = SupervisedOptions

    def __init__(self, options: SupervisedOptions, num_classes: int):
        super().__init__()
        self.opt, self.num_classes = options, num_classes
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        if ctx.spec.multi_view:
            raise ConfigError(f"method '{cls.name}' trains on one clip per sample; data.sampler "
                              f"'{ctx.spec.sampler}' gives several (use random)")
        if not 0 < options.layer_decay <= 1 or not 0 <= options.label_smoothing < 1:
            raise ConfigError("method.options: layer_decay must be in (0, 1] and label_smoothing in [0, 1)")
        task = task_of(options, cls.name)
        net = build_classifier(cfg, options, task, options.dropout, options.pretrained)
        method = cls(options, len(task.classes))
        setup_labels(method, cfg, ctx, options, task)
        return net, method

    def lr_scale(self, names: list[str]) -> dict[str, float]:
        """Layer-wise lr decay over the classifier's parameter names (the engine's optimizer reads it)."""
        return layer_decay_scale(names, self.opt.layer_decay)

    def prepare(self, batch: dict) -> dict:
        """Keep the labelled samples (all of them unless data.labelled_fraction < 1), then mix. A
        batch without any labelled sample is kept whole at weight 0 (every process still runs the
        same forward and backward, as DDP needs)."""
        labels = targets_of(self, batch)
        keep = labels != UNLABELLED
        weight = 1.0 if bool(keep.any()) else 0.0
        if weight:
            batch = select_rows(batch, keep)
            labels = labels[keep]
        else:
            labels = torch.zeros_like(labels)
        soft = smooth_one_hot(labels, self.num_classes, self.opt.label_smoothing)
        video = batch["video"]
        if self.training and weight:
            video, soft, _ = mix_batch(video, soft, self.opt.mixup, self.opt.cutmix, self.opt.mix_prob,
                                       self.opt.switch_prob)
        return {**batch, "video": video, "targets": soft, "labels": labels, "loss_weight": weight}

    def forward(self, embeddings: dict, batch: dict):
        logits = embeddings["logits"]
        loss = soft_cross_entropy(logits, batch["targets"]) * batch["loss_weight"]
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean() * 100 * batch["loss_weight"]
        labelled = logits.shape[0] * batch["loss_weight"]
        return loss, {"ce": loss.detach(), "train_top1": accuracy.detach(),
                      "labelled": torch.tensor(float(labelled), device=loss.device)}

    @torch.no_grad()
    def after_step(self, model, step: int) -> None:
        self.validation(model, step)

    def log_values(self) -> dict[str, float]:
        return dict(self.validation.last)
