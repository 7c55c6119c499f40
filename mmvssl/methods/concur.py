"""`concur`: ConCur (Roy and Etemad, "Temporal Contrastive Learning with Curriculum", ICASSP 2023,
arXiv 2209.00760): contrastive learning whose positives start temporally close and move apart as
training goes on, plus an auxiliary head that predicts how far apart the two positives are.

- Views (`data.sampler: concur`, mmvssl.data.sampling.curriculum_pair): two clips of `data.num_frames`
  frames at `data.fps` from anywhere in the video, the second starting d seconds after the first,
  d uniform in [0, share(step) x (duration - window)]: the span is bounded by the video itself.
- Curriculum: share(step) grows linearly from `span_start` (a share of what the video allows) to 1
  over the first `curriculum` share of train.max_steps, then stays at 1. The method sets it on the
  loader's SampleSpec when it is built (`curriculum_steps`, `span_start`); each sample's step is the
  place of its batch in the stream (one batch a step), so a resumed stream, which starts at the
  consumed batch, draws what the uninterrupted one drew (exact when no sample failed to decode).
- Loss: NT-Xent between the two clips' embeddings `video_<space>` (temperature `temperature`),
  plus `distance_weight` x the cross-entropy of a head that reads both clips' features p (the mean
  of the encoder's tokens) as [p_a, p_b, p_a * p_b, |p_a - p_b|] and classifies d / (duration -
  window), the share of the video between them, into `distance_bins` equal bins (computed in
  `prepare` from batch["view_times"] and each sample's duration; the mean over the global batch).

Reference: no official code found public after looking (the code index holds 34 repositories of
ShuvenduRoy, none of them ConCur; searches by the paper's title and mechanism found none; a curated
list of video SSL papers gives the paper with no code link), so the module follows the paper. Departures: the schedule is in steps, not epochs; the
head's form (a 2-layer MLP over the pair classifying the share of the video in bins) is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.contrastive import global_mean, nt_xent_loss
from ..losses.gather import gather_no_grad
from .base import BuildContext, Method, mlp, require_output
from .contrastive import build_student
from .views import view_windows


@dataclass
class ConCurOptions:
    span_start: float = 0.0  # share of (duration - window) the clips' distance may reach at step 0
    curriculum: float = 0.5  # share of train.max_steps over which it grows to 1 (the whole video)
    temperature: float = 0.1
    distance_weight: float = 1.0  # the auxiliary temporal-distance classification
    distance_bins: int = 8  # classes of d / (duration - window)
    head_hidden: int = 256
    space: str = "ssl"


def linear_share(step: int, start: float, steps: int) -> float:
    """The curriculum: the share of the video the positives' distance may reach at `step`."""
    if steps <= 0 or step >= steps:
        return 1.0
    return start + (1.0 - start) * step / steps


def distance_labels(windows: torch.Tensor, durations: torch.Tensor, bins: int) -> torch.Tensor:
    """windows (B, 2, 2) [start, end] seconds of the two clips, durations (B,) -> (B,) the bin of
    d / (duration - window) (d the second clip's start minus the first's) among `bins` equal bins;
    0 where the video holds no room to move."""
    distance = (windows[:, 1, 0] - windows[:, 0, 0]).clamp(min=0)
    room = (durations - (windows[:, 0, 1] - windows[:, 0, 0])).clamp(min=0)
    share = torch.where(room > 1e-6, distance / room.clamp(min=1e-6), torch.zeros_like(distance))
    return (share * bins).floor().long().clamp(0, bins - 1)


class ConCur(Method):
    name = "concur"
    views_on_device = True  # `mmvssl views` runs prepare: the distance labels are made there
    paper = ("ConCur (Roy and Etemad 2023): a curriculum of temporal span between positives, "
             "temporal distance prediction")
    Options = ConCurOptions

    def __init__(self, options: ConCurOptions, width: int, max_steps: int):
        super().__init__()
        o = options
        if not 0 <= o.span_start <= 1 or not 0 <= o.curriculum <= 1:
            raise ConfigError(f"method 'concur': method.options.span_start ({o.span_start}) and curriculum "
                              f"({o.curriculum}) are shares, in [0, 1]")
        if o.temperature <= 0 or o.distance_bins < 1:
            raise ConfigError("method 'concur': method.options.temperature must be > 0 and distance_bins >= 1")
        self.o, self.max_steps = o, max_steps
        self.key = f"video_{o.space}"
        self.distance_head = mlp(4 * width, o.head_hidden, o.distance_bins, batch_norm=True)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # steps taken, checkpointed
        self.modalities = {"video"}

    @property
    def curriculum_steps(self) -> int:
        return round(self.o.curriculum * self.max_steps)

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        spec = ctx.spec
        if spec.sampler != "concur":
            raise ConfigError(f"method 'concur' draws two clips of a video at a distance that grows with the step: "
                              f"use data.sampler=concur (got sampler '{spec.sampler}')")
        net = build_student(cfg, ctx.accelerator)
        dims = require_output(net, f"video_{options.space}", cls.name)
        net.frame_features = True  # forward also returns video_frames (B, V, t, width): the head reads their mean
        method = cls(options, dims["video_frames"], cfg.train.max_steps)
        spec.curriculum_steps, spec.span_start = max(1, method.curriculum_steps), options.span_start  # the loader's
        return net, method

    def decayed_modules(self) -> list[nn.Module]:
        return [self.distance_head]

    def span(self, step: int) -> float:
        """The share of (duration - window) the positives' distance may reach at `step`."""
        return linear_share(step, self.o.span_start, self.curriculum_steps)

    def prepare(self, batch: dict) -> dict:
        video = batch["video"]  # (B, 2, C, T, H, W): the two clips
        if video.ndim != 6 or video.shape[1] != 2:
            raise ConfigError(f"method 'concur' expects video (B, 2, C, T, H, W), got {tuple(video.shape)}")
        windows = view_windows(batch, video.device)  # (B, 2, 2)
        durations = torch.tensor([float(m.get("duration") or 0.0) for m in batch["meta"]], device=video.device)
        return {**batch, "concur_distance": distance_labels(windows, durations, self.o.distance_bins)}

    def forward(self, embeddings: dict, batch: dict):
        clips = embeddings[self.key].float()  # (B, 2, D), normalised
        contrast = nt_xent_loss(clips[:, 0], clips[:, 1], self.o.temperature)
        terms = {"nt_xent": contrast.detach()}
        loss = contrast
        if self.o.distance_weight > 0:
            pooled = embeddings["video_frames"].float().mean(2)  # (B, 2, width): each clip's mean token
            a, b = pooled[:, 0], pooled[:, 1]
            logits = self.distance_head(torch.cat([a, b, a * b, (a - b).abs()], dim=-1))
            target = batch["concur_distance"]
            ones = torch.ones(len(target), device=logits.device)
            distance = global_mean(F.cross_entropy(logits, target, reduction="none"), ones, gather_no_grad(ones))
            terms["distance"] = distance.detach()
            terms["distance_accuracy"] = (logits.argmax(-1) == target).float().mean().detach()
            loss = loss + self.o.distance_weight * distance
        return loss, terms

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        self.step.fill_(step)

    def log_values(self) -> dict[str, float]:
        return {"span": float(self.span(int(self.step)))}
