"""`concur`: ConCur (Roy and Etemad, "Temporal Contrastive Learning with Curriculum", ICASSP 2023,
arXiv 2209.00760): contrastive learning whose positives start temporally close and move apart as
training goes on, plus an auxiliary head that predicts how far apart the two positives are.

- Data (`data.sampler: same`, `data.num_clips: 2`): one long window of `data.num_frames` frames,
  decoded once and augmented twice (two views). The method cuts the two positives out of it on
  the device: a clip of `clip_frames` frames from view 0 and one from view 1 that starts
  `d` frames later, d drawn uniformly in [0, span(step)]. Cutting on the device is what lets the
  curriculum follow the training step (the loader's workers do not know it) and costs no decode.
- Curriculum: span(step) grows linearly from `span_start` to `span_end` frames (default: the
  whole window, num_frames - clip_frames) over the first `curriculum` share of train.max_steps,
  then stays there. The span is a function of the step, which the method checkpoints, so a
  resumed run continues it exactly; each step's draws come from a generator seeded by
  (train.seed, step) over the global batch, so they do not depend on where a run was resumed or
  on how many processes share the batch.
- Loss: NT-Xent between the two clips' embeddings `video_<space>` (temperature `temperature`),
  plus `distance_weight` x the cross-entropy of a head that reads both clips' features p (the mean
  of the encoder's tokens) as [p_a, p_b, p_a * p_b, |p_a - p_b|] and classifies d into
  span_end + 1 classes (the mean over the global batch, each process its share).

Departures: the paper samples the two clips from the whole video with a span in seconds and an
epoch schedule; here the span is in frames of the decoded long window (its fps is data.fps) and
the schedule is in steps. The head's form (a 2-layer MLP over the pair, classification rather
than regression) is ours: the paper's exact head was not available to us.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.contrastive import global_mean, nt_xent_loss
from ..losses.gather import gather_no_grad, world
from .base import BuildContext, Method, mlp, require_output
from .contrastive import build_student


@dataclass
class ConCurOptions:
    clip_frames: int = 8  # frames of each positive clip, cut from the long window of data.num_frames
    span_start: int = 0  # frames between the two clips' starts, at most, at step 0
    span_end: int = -1  # ... at the end of the curriculum (-1: data.num_frames - clip_frames)
    curriculum: float = 0.5  # share of train.max_steps over which the span grows
    temperature: float = 0.1
    distance_weight: float = 1.0  # the auxiliary temporal-distance classification
    head_hidden: int = 256
    space: str = "ssl"


def linear_span(step: int, start: int, end: int, steps: int) -> int:
    """The curriculum: frames between positives allowed at `step`, from `start` to `end` over `steps`."""
    if steps <= 0 or step >= steps:
        return end
    return start + int((end - start) * step / steps)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a step's draws: the same on every process and in a resumed run."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 62))


def draw_pairs(batch_size: int, num_frames: int, clip_frames: int, span: int, seed: int, step: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(first start, distance), each (world * batch_size,) frame indices: distance uniform in
    [0, span], then the first clip's start uniform where both clips fit in num_frames."""
    g = step_generator(seed, step)
    n = world()[1] * batch_size
    distance = torch.randint(0, span + 1, (n,), generator=g)
    room = num_frames - clip_frames - distance  # last start that keeps the second clip inside
    first = (torch.rand(n, generator=g) * (room + 1)).floor().long().minimum(room)
    return first, distance


def cut_clips(video: torch.Tensor, first: torch.Tensor, second: torch.Tensor, clip_frames: int) -> torch.Tensor:
    """video (B, 2, C, T, H, W), starts first/second (B,) frame indices -> (B, 2, C, clip_frames, H, W):
    view 0's clip at `first`, view 1's at `second`."""
    B, _, C, T, H, W = video.shape
    frames = torch.arange(clip_frames, device=video.device)
    clips = []
    for v, start in ((0, first), (1, second)):
        index = (start.to(video.device)[:, None] + frames).view(B, 1, clip_frames, 1, 1).expand(B, C, clip_frames, H, W)
        clips.append(video[:, v].gather(2, index))
    return torch.stack(clips, dim=1)


class ConCur(Method):
    name = "concur"
    paper = ("ConCur (Roy and Etemad 2023): a curriculum of temporal span between positives, "
             "temporal distance prediction")
    Options = ConCurOptions

    def __init__(self, options: ConCurOptions, width: int, num_frames: int, max_steps: int, seed: int):
        super().__init__()
        o = options
        self.o, self.num_frames, self.max_steps, self.seed = o, num_frames, max_steps, seed
        self.span_end = num_frames - o.clip_frames if o.span_end < 0 else o.span_end
        if o.clip_frames < 1 or o.clip_frames > num_frames:
            raise ConfigError(f"method 'concur': method.options.clip_frames {o.clip_frames} must be 1..data.num_frames "
                              f"({num_frames}): the clips are cut from the decoded window")
        if not 0 <= o.span_start <= self.span_end <= num_frames - o.clip_frames:
            raise ConfigError(f"method 'concur': need 0 <= span_start ({o.span_start}) <= span_end ({self.span_end}) "
                              f"<= data.num_frames - clip_frames ({num_frames - o.clip_frames})")
        if o.temperature <= 0:
            raise ConfigError("method 'concur': method.options.temperature must be > 0")
        self.key = f"video_{o.space}"
        self.distance_head = mlp(4 * width, o.head_hidden, self.span_end + 1, batch_norm=True)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # steps taken, checkpointed
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        spec = ctx.spec
        if spec.sampler != "same" or spec.num_clips != 2:
            raise ConfigError(f"method 'concur' cuts its two clips from two views of one window: use data.sampler=same "
                              f"with data.num_clips=2 (got sampler '{spec.sampler}', {spec.num_clips} clips)")
        net = build_student(cfg, ctx.accelerator)
        dims = require_output(net, f"video_{options.space}", cls.name)
        net.frame_features = True  # forward also returns video_frames (B, V, t, width): the head reads their mean
        return net, cls(options, dims["video_frames"], spec.num_frames, cfg.train.max_steps, cfg.train.seed)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.distance_head]

    def span(self, step: int) -> int:
        return linear_span(step, self.o.span_start, self.span_end, round(self.o.curriculum * self.max_steps))

    def prepare(self, batch: dict) -> dict:
        video = batch["video"]  # (B, 2, C, T, H, W): two augmentations of one long window
        B, T = video.shape[0], video.shape[3]
        if video.ndim != 6 or video.shape[1] != 2 or T != self.num_frames:
            raise ConfigError(f"method 'concur' expects video (B, 2, C, {self.num_frames}, H, W), "
                              f"got {tuple(video.shape)}")
        step = int(self.step)
        rank, _ = world()
        first, distance = draw_pairs(B, self.num_frames, self.o.clip_frames, self.span(step), self.seed, step)
        first, distance = first[rank * B:(rank + 1) * B], distance[rank * B:(rank + 1) * B]  # this process's clips
        batch = dict(batch)
        batch["video"] = cut_clips(video, first, first + distance, self.o.clip_frames)
        batch["concur_distance"] = distance.to(video.device)
        if "view_times" in batch:  # the clips' own windows, for anything that reads them
            times = batch["view_times"]
            per_frame = (times[..., 1] - times[..., 0]) / self.num_frames  # (B, 2)
            starts_s = torch.stack([first, first + distance], 1).to(times) * per_frame + times[..., 0]
            batch["view_times"] = torch.stack([starts_s, starts_s + per_frame * self.o.clip_frames], -1)
        return batch

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
