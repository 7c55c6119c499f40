"""`svt`: Self-supervised Video Transformer (Ranasinghe et al. 2022): DINO (Caron et al. 2021) on
global and local views of a video.

- Views (`data.sampler: svt`, mmvssl.data.sampling.global_local_windows), all cut from one clip of
  `data.long_scale` x `data.num_frames / data.fps` seconds placed at random in the video, as SVT's
  code does (kahnchana/svt, datasets/decoder.py `decode` with temporal_aug): `data.num_global`
  global views spanning the clip (less 5/256 of it at one end or the other), `data.num_frames`
  frames of `data.size` px each, in `video`; and `data.num_local` local views (SVT: 8), each an
  eighth of the clip placed at random in it, `data.local_frames` frames of `data.local_size` px
  cropped with `data.augment.local_crop_area` (DINO's small crops), in the view group
  `video/local`. Globals and locals so differ in span (8x) and frame rate (8 x local_frames /
  num_frames). The student embeds each group with its own forward (they differ in size), globals
  first.
- Student: the model (encoder + projection head `video_ssl`, L2-normalised: DINO's bottleneck)
  followed by the method's prototype layer (weight-normalised linear, norm fixed: DINO's
  `norm_last_layer`). It embeds every view.
- Teacher: an exponential moving average of the student and of its prototypes, on the global
  views only; it takes no gradient. Its momentum follows a cosine from `momentum_start` to
  `momentum_end` over `train.max_steps` (a schedule of the step, so a resumed run continues it).
- Loss: for every teacher (global) view g and every student view v != g, the cross-entropy
  between the teacher's centred, sharpened distribution softmax((t_g - c) / tau_t) and the
  student's softmax(s_v / tau_s), averaged over pairs and clips. tau_t follows SVT's schedule by
  epoch (linspace from `warmup_teacher_temperature` to `teacher_temperature` over
  `teacher_temperature_warmup_epochs`, endpoint included; an epoch is `steps_per_epoch` steps).
- Centre: the loss centres with c from before this step; after it, c <- m c + (1 - m) mean of the
  teacher's raw outputs over the global batch (every process).
- Loss, schedule and centre follow kahnchana/svt @ 1827106d train_ssl.py `DINOLoss` (two_token=False,
  2 global crops; the same as facebookresearch/dino @ 7c446df main_dino.py `DINOLoss`), checked
  against the official numbers in tests/parity/dino.py.

Departures from the paper: SVT's cross-view motion correspondence terms are the same DINO loss
over the mixed frame rates and sizes, as in its code; the local views share one frame count
(`data.local_frames`: SVT's default gives every view num_frames, its `RAND_FR` option 2, 4, 8 or 16
per local view); frames are taken at even times over each view's span (SVT: evenly spaced indices
of the decoded clip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.gather import world
from ..modalities import group_key
from .base import BuildContext, Method, cosine_schedule, ema_update, frozen_copy, require_output, unwrap
from .contrastive import build_student


@dataclass
class SVTOptions:
    prototypes: int = 65536  # DINO's K (the tiny configs use fewer)
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    warmup_teacher_temperature: float = 0.04
    # SVT's --warmup_teacher_temp_epochs: linspace(warmup, teacher, n) with its endpoint, then constant
    teacher_temperature_warmup_epochs: int = 0
    steps_per_epoch: int = 1  # optimizer steps per epoch of that schedule (SVT indexes it by epoch)
    center_momentum: float = 0.9
    momentum_start: float = 0.996  # teacher EMA momentum, cosine to momentum_end over train.max_steps
    momentum_end: float = 1.0
    space: str = "ssl"


class Prototypes(nn.Module):
    """DINO's last layer: a linear map to K prototypes, weight-normalised with the norm fixed at 1."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., K)
        return F.linear(F.normalize(z, dim=-1), F.normalize(self.weight, dim=-1))


def teacher_temperature_schedule(warmup: float, final: float, warmup_epochs: int, epoch: int) -> float:
    """The teacher temperature of `epoch` as SVT's train_ssl.py (and DINO's main_dino.py) build it:
    np.linspace(warmup, final, warmup_epochs) -- endpoint included, so the last warm-up epoch is already
    at `final` -- then `final` for every later epoch."""
    if epoch < warmup_epochs:
        return float(np.linspace(warmup, final, warmup_epochs)[epoch])
    return float(final)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> torch.Tensor:
    """DINO's centre after a step: momentum * centre + (1 - momentum) * the mean of the raw teacher
    outputs (before centring and temperature) over every row of every process. center (..., K),
    teacher (..., K) this process's rows."""
    rows = teacher.reshape(-1, teacher.shape[-1])  # (N, K)
    batch_center, count = rows.sum(dim=0), rows.shape[0]
    _, size = world()
    if size > 1:
        dist.all_reduce(batch_center)
        count *= size
    return center * momentum + (batch_center / count).view_as(center) * (1 - momentum)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temperature: float,
              teacher_temperature: float) -> torch.Tensor:
    """student (B, V, K) logits of every view, teacher (B, G, K) of the global views (the first G of
    the student's); mean over (g, v != g) pairs and clips of CE(teacher_g -> student_v)."""
    targets = F.softmax((teacher - center) / teacher_temperature, dim=-1)  # (B, G, K)
    log_probs = F.log_softmax(student / student_temperature, dim=-1)  # (B, V, K)
    total, pairs = 0.0, 0
    for g in range(teacher.shape[1]):
        for v in range(student.shape[1]):
            if v == g:
                continue
            total = total + (-targets[:, g] * log_probs[:, v]).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


class SVT(Method):
    name = "svt"
    paper = "SVT (Ranasinghe et al. 2022): DINO with global and local video views"
    Options = SVTOptions

    def __init__(self, student: nn.Module, options: SVTOptions, num_global: int, max_steps: int):
        super().__init__()
        if options.steps_per_epoch < 1 or options.teacher_temperature_warmup_epochs < 0:
            raise ConfigError(f"method 'svt': method.options.steps_per_epoch must be >= 1 and "
                              f"teacher_temperature_warmup_epochs >= 0 (got {options.steps_per_epoch}, "
                              f"{options.teacher_temperature_warmup_epochs})")
        self.o, self.num_global, self.max_steps = options, num_global, max_steps
        self.key = f"video_{options.space}"
        dim = student.output_dims()[self.key]
        self.prototypes = Prototypes(dim, options.prototypes)
        self.teacher = frozen_copy(student)
        self.teacher_prototypes = frozen_copy(self.prototypes)
        self.register_buffer("center", torch.zeros(options.prototypes))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # for the schedules, checkpointed
        self._batch_center: torch.Tensor | None = None
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        spec = ctx.spec
        if spec.sampler != "svt" or spec.num_global < 1 or spec.num_global + spec.num_local < 2:
            raise ConfigError(f"method 'svt' needs data.sampler=svt with data.num_global >= 1 and two views or "
                              f"more (got sampler '{spec.sampler}', {spec.num_global} global, {spec.num_local} local)")
        net = build_student(cfg, ctx.accelerator)
        require_output(net, f"video_{options.space}", cls.name)
        return net, cls(net, options, spec.num_global, cfg.train.max_steps)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.prototypes]

    def momentum(self, step: int) -> float:
        return cosine_schedule(self.o.momentum_start, self.o.momentum_end, step, self.max_steps)

    def teacher_temperature(self, step: int) -> float:
        """The schedule at the epoch of `step` (steps taken before this one)."""
        o = self.o
        return teacher_temperature_schedule(o.warmup_teacher_temperature, o.teacher_temperature,
                                            o.teacher_temperature_warmup_epochs, step // o.steps_per_epoch)

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        video = batch["video"]  # (B, G, C, T, H, W): the global views
        student = self.prototypes(model({"video": video})[self.key])  # (B, G, K)
        local = batch.get(group_key("video", "local"))  # (B, L, C, t, h, w)
        if local is not None:
            student = torch.cat([student, self.prototypes(model({"video": local})[self.key])], dim=1)  # (B, V, K)
        with torch.no_grad():
            self.teacher.train(model.training)
            teacher = self.teacher_prototypes(self.teacher({"video": video[:, :self.num_global]})[self.key])
        return {"student": student, "teacher": teacher}  # (B, G, K)

    def forward(self, embeddings: dict, batch: dict):
        teacher = embeddings["teacher"].detach().float()
        tau_t = self.teacher_temperature(int(self.step))
        loss = dino_loss(embeddings["student"].float(), teacher, self.center, self.o.student_temperature, tau_t)
        self._batch_center = teacher  # (B, G, K) raw teacher outputs: the centre moves after the step
        with torch.no_grad():  # the part of the loss the student cannot change (logged, not optimised)
            targets = F.softmax((teacher - self.center) / tau_t, dim=-1)
            entropy = -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean()
        return loss, {"dino": loss.detach(), "teacher_entropy": entropy}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        self.step.fill_(step)
        m = self.momentum(step - 1)  # the step just taken: momentum_start after the first
        ema_update(self.teacher, unwrap(model), m)
        ema_update(self.teacher_prototypes, self.prototypes, m)
        if self._batch_center is not None:  # the loss used the centre from before this update
            self.center.copy_(update_center(self.center, self._batch_center, self.o.center_momentum))
            self._batch_center = None

    def log_values(self) -> dict[str, float]:
        step = int(self.step)
        return {"momentum": self.momentum(step), "teacher_temperature": self.teacher_temperature(step)}
