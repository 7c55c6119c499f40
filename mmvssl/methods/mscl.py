"""`mscl`: MSCL (Ni et al., ECCV 2022, "Motion Sensitive Contrastive Learning for Self-supervised
Video Representation"), following the official code, megvii-research/MSCL at commit 0b080e5:
the recognizer `MSCLWithAug` (mmaction/models/recognizers/mscl.py), the flow rotation
`NormFlowWithStidedAug` / `norm_flow` (mmaction/datasets/pipelines/transforms_motion.py), the
cross-modal head `MSCLWithAugMxHead` and the local head `MSCLWithAugPosHeadV2`
(mmaction/models/heads/local_cl_head.py), and the released pretraining config
configs/recognition/moco/mscl_r18_cosm_lr2e-2.py.

As implemented:
- Views (`data.sampler: same` with 2 clips): two augmentations of one window, each with its own
  motion (`motion: flow`, the cached optical flow cropped and flipped with the view, or `motion:
  tgrad`, the temporal gradient between consecutive decoded frames). The RGB stream is the model;
  the motion stream a network of the same architecture owned by the method
  (mmvssl/methods/motion_stream.py). Flow frames are normalised as `norm_flow`: each frame divided
  by its largest vector length + 1e-5.
- Flow rotation augmentation (FRA, `rotation: true`, flow only): one chunk id c per clip drawn
  uniformly from 0..7, beta = (0.2 + 0.2 c) pi (0.2 pi .. 1.6 pi; the config's ratios (0.2, 1.8)
  in 8 chunks), the same for every frame and both views; the flow *vectors* turn by beta
  (u' = cos b u - sin b v, v' = sin b u + cos b v) and the layout stays (`rotate_flow`), then
  `norm_flow`. The rotated clips go through the same motion network.
- Clip level, each term a cross-entropy at temperature 0.07 (the official T), every weight 1 as in
  the released config: RGB view 0 -> RGB view 1 (`rgb`), motion view 0 -> motion view 1 and
  rotated motion view 0 -> rotated view 1 (`motion`), and across modalities RGB 0 -> motion 1 and
  motion 0 -> RGB 1, plus the same with the rotated motion (`cross`; the official
  `weight_aug_flow=(1, 1)`: rotated flow is a positive of its clip at clip level). Negatives: the
  other clips' keys of the key's modality (the official `same_kn=True`).
- Frame level (local motion contrastive learning, `frame`; `local_motion_loss`): RGB frame i of
  view 0 against the 2t motion frames of the same clip and view, the t original ones then the t
  rotated ones: positive its own-time original motion frame, negatives the clip's other original
  frames and all its rotated frames; features average-pooled over space, L2-normalised, identity
  transforms (the config's `bkb_channels=(None, None)`), T 0.07, mean over the b t rows.
- Motion differential sampling (MDS, `keep_share` < 1), on the device in `prepare`: the candidate
  sub-clips are the runs of `keep_share` x the decoded frames; each clip draws uniformly among the
  candidates whose motion (mean |tgrad| of view 0 or mean flow magnitude over the run) is above the
  median of the window's candidates (all of them when none is); both views keep the same run.
- loss = rgb_weight * rgb + motion_weight * motion + cross_weight * cross + frame_weight * frame.
  The saved model is the RGB stream.

Differences from the official code (docs/methods.md lists them with their reasons): negatives
come from the global batch, not MoCo queues of 65536 keys with momentum encoders; the flow is
OpenCV's DIS / Farneback cached at `shards add-flow`'s rate, not RAFT; MDS chooses inside the
decoded window, not among the clips of the whole video; the frame features are the transformer's
per-time token means (the official: an FPN neck on an R3D-18); with `motion: tgrad` there are no
vectors to rotate, so FRA needs `motion: flow`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.gather import gather_with_grad, world
from .base import BuildContext, Method
from .motion_stream import (MotionPathway, build_motion_network, build_same_window_student, check_motion, motion_input,
                            motion_modalities)

TEMPERATURE = 0.07  # the official T of every head in mscl_r18_cosm_lr2e-2.py
NORM_FLOW_EPS = 1e-5  # transforms_motion.norm_flow


@dataclass
class MSCLOptions:
    motion: str = "flow"  # flow (cached by `shards add-flow`, the paper's) or tgrad (consecutive-frame differences)
    rgb_weight: float = 1.0  # RGB view 0 -> RGB view 1
    motion_weight: float = 1.0  # motion view 0 -> motion view 1 (and the rotated pair with FRA)
    cross_weight: float = 1.0  # RGB <-> motion across the views (and RGB <-> rotated motion with FRA)
    frame_weight: float = 1.0  # the local, frame-level loss (rotated frames as negatives with FRA)
    rotation: bool = True  # FRA: flow vectors rotated by (0.2 + 0.2 c) pi, c in 0..num_chunks-1 (flow only)
    num_chunks: int = 8
    keep_share: float = 1.0  # MDS: sub-clips of this share of the decoded frames, drawn above the median motion
    temperature: float = TEMPERATURE
    space: str = "ssl"


def rotation_angle(chunk: torch.Tensor | int, num_chunks: int = 8, ratios: tuple[float, float] = (0.2, 1.8)):
    """The official strided rotation angle: beta = (start + stride * chunk) * pi with stride =
    (ratios[1] - ratios[0]) / num_chunks, chunk in 0..num_chunks-1 (so ratios[1] * pi itself is never
    drawn)."""
    stride = (ratios[1] - ratios[0]) / num_chunks
    if isinstance(chunk, torch.Tensor):
        return (ratios[0] + stride * chunk.to(torch.float64)) * math.pi
    return (ratios[0] + stride * chunk) * math.pi


def rotate_flow(flow: torch.Tensor, beta: torch.Tensor | float, dim: int) -> torch.Tensor:
    """Flow vectors (u, v) on axis `dim` (u: x to the right, v: y down) turned by angle beta (a
    number, or a tensor broadcasting against the flow with axis `dim` removed): u' = cos b u - sin b
    v, v' = sin b u + cos b v. Pixel positions do not move (the official FRA keeps the layout)."""
    u, v = flow.unbind(dim)
    beta = torch.as_tensor(beta, dtype=torch.float64, device=flow.device)
    cos, sin = torch.cos(beta).to(flow.dtype), torch.sin(beta).to(flow.dtype)
    return torch.stack([cos * u - sin * v, sin * u + cos * v], dim=dim)


def norm_flow(flow: torch.Tensor, dim: int, frame_dims: tuple[int, ...], eps: float = NORM_FLOW_EPS) -> torch.Tensor:
    """Each flow frame divided by (its largest vector length + eps): vectors on axis `dim`, the
    frame's pixels on `frame_dims` (the official norm_flow)."""
    length = flow.norm(dim=dim, keepdim=True)
    return flow / (length.amax(dim=frame_dims, keepdim=True) + eps)


def local_motion_loss(rgb: torch.Tensor, motion: torch.Tensor, rotated: torch.Tensor | None,
                      temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frame-level loss of MSCLWithAugPosHeadV2. rgb (b, c, t, ...), motion and rotated (b, c,
    t, ...) frame features (any spatial dims after t, average-pooled). -> (scores (b t, 2t) [or
    (b t, t) without rotated], labels (b t,), loss): RGB frame i of a clip against the clip's motion
    frames then its rotated frames, target i, cross-entropy averaged over the b t rows."""
    def pooled(x):  # (b, c, t, ...) -> (b, c, t), normalised over c
        return F.normalize(x.flatten(3).mean(-1) if x.ndim > 3 else x, dim=1)
    b, _, t = rgb.shape[:3]
    keys = motion if rotated is None else torch.cat([motion, rotated], dim=2)  # (b, c, 2t, ...)
    sim = torch.bmm(pooled(rgb).transpose(1, 2), pooled(keys))  # (b, t, 2t)
    scores = sim.flatten(0, 1) / temperature
    labels = torch.arange(t, device=rgb.device).repeat(b)
    return scores, labels, F.cross_entropy(scores, labels)


def directed_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE from each query (B, D) to the keys of the global batch (normalised), its own key
    positive: the in-batch form of the official MoCo heads' query -> key cross-entropy."""
    rank, _ = world()
    labels = torch.arange(query.shape[0], device=query.device) + rank * query.shape[0]
    return F.cross_entropy(query @ gather_with_grad(key).T / temperature, labels)


def run_motion(energy: torch.Tensor, keep: int) -> torch.Tensor:
    """energy (B, T) -> (B, R) the motion of each run of `keep` frames (its steps inside the run)."""
    steps = energy[:, :-1] if keep > 1 else energy
    return steps.unfold(1, max(keep - 1, 1), 1).sum(-1)


def median_motion_start(energy: torch.Tensor, keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """energy (B, T), frame t's motion towards frame t + 1 -> (B,) the start of a run of `keep`
    frames drawn uniformly among the runs whose motion (steps inside the run) is above the median of
    the window's runs (every run when none is): MSCL's motion differential sampling."""
    runs = run_motion(energy, keep)  # (B, R)
    above = runs > runs.median(dim=1, keepdim=True).values
    above = torch.where(above.any(dim=1, keepdim=True), above, torch.ones_like(above))
    draw = torch.rand(runs.shape, generator=generator, device=runs.device)
    return torch.where(above, draw, torch.full_like(draw, -1.0)).argmax(dim=1)


def motion_energy(batch: dict, kind: str) -> torch.Tensor:
    """(B, T) motion of view 0 at each frame: mean |temporal gradient| (tgrad) or mean flow length."""
    if kind == "flow":
        return batch["flow"][:, 0].float().norm(dim=1).mean(dim=(-2, -1))
    return motion_input(batch, "tgrad")[:, 0].float().abs().mean(dim=(1, 3, 4))


class MSCL(Method):
    name = "mscl"
    views_on_device = True  # `mmvssl views` runs prepare: motion differential sampling draws there
    paper = "MSCL (Ni et al. 2022): RGB-flow contrast at clip and frame level, rotated flow, motion sampling"
    Options = MSCLOptions

    def __init__(self, student: nn.Module, motion_network: nn.Module, options: MSCLOptions, num_frames: int):
        super().__init__()
        check_motion(options.motion, self.name)
        weights = (options.rgb_weight, options.motion_weight, options.cross_weight, options.frame_weight)
        if max(weights) <= 0:
            raise ConfigError("method 'mscl': every loss weight is 0 (no loss)")
        if not 0 < options.keep_share <= 1:
            raise ConfigError(f"method 'mscl': method.options.keep_share must be in (0, 1], got {options.keep_share}")
        if options.rotation and options.motion != "flow":
            raise ConfigError("method 'mscl': method.options.rotation turns flow vectors (FRA) and needs "
                              "method.options.motion=flow (with data.flow=true); set rotation=false for tgrad")
        if options.num_chunks < 1:
            raise ConfigError(f"method 'mscl': method.options.num_chunks must be >= 1, got {options.num_chunks}")
        rgb_width, motion_width = student.output_dims()["video_frames"], motion_network.output_dims()["video_frames"]
        if options.frame_weight > 0 and rgb_width != motion_width:
            raise ConfigError(f"method 'mscl': the frame loss compares RGB and motion frame features directly "
                              f"(identity transforms, as the official head): widths {rgb_width} and {motion_width}")
        self.o, self.key, self.num_frames = options, f"video_{options.space}", num_frames
        self.keep = max(1, round(num_frames * options.keep_share))
        self.motion = MotionPathway(motion_network, options.motion, self.key)
        self.modalities = motion_modalities(options.motion)

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        net = build_same_window_student(cls, cfg, ctx, options,
                                        "pairs RGB and motion of one window in two augmentations")
        net.frame_features = True  # video_frames: the frame-level features
        motion = build_motion_network(cfg, options.motion, cls.name)
        motion.frame_features = True
        return net, cls(net, motion, options, ctx.spec.num_frames)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.motion.network]

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """MDS: both views (their next frames and flow with them) cut to a run of keep_share of the
        frames, drawn above the window's median motion."""
        video = batch["video"]  # (B, 2, C, T, H, W)
        if video.ndim != 6 or video.shape[1] != 2 or video.shape[3] != self.num_frames:
            raise ConfigError(f"method 'mscl' expects 2 views of {self.num_frames} frames, got {tuple(video.shape)}")
        out = dict(batch)
        keep = self.keep
        if keep < self.num_frames:
            energy = motion_energy(batch, self.o.motion)  # (B, T)
            start = median_motion_start(energy, keep)  # (B,)
            out["mscl_run_motion"] = run_motion(energy, keep)  # (B, R): the candidates (`mmvssl views`)
            index = start[:, None] + torch.arange(keep, device=video.device)  # (B, keep)
            for name in ("video", "video_next", "flow"):
                if name in batch:
                    x = batch[name]  # (B, 2, C, T, H, W)
                    out[name] = x.gather(3, index[:, None, None, :, None, None].expand(
                        *x.shape[:3], keep, *x.shape[4:]))
            out["mscl_start"] = start
        return out

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        rgb = model({"video": batch["video"]})  # (B, 2, D), frames (B, 2, t, width)
        motion = motion_input(batch, self.o.motion)  # (B, 2, C_m, T, H, W)
        if self.o.motion == "flow":
            motion = norm_flow(motion, dim=2, frame_dims=(-2, -1))
        if self.o.rotation:  # chunks drawn here: feature-cached accumulation replays the RNG
            chunk = torch.randint(0, self.o.num_chunks, (motion.shape[0],), device=motion.device)
            beta = rotation_angle(chunk, self.o.num_chunks).view(-1, 1, 1, 1, 1)  # one angle per clip, both views
            rotated = norm_flow(rotate_flow(motion, beta, dim=2), dim=2, frame_dims=(-2, -1))
            motion = torch.cat([motion, rotated], dim=1)  # (B, 4, 2, T, H, W): views 0, 1, rotated 0, 1
        self.motion.network.train(model.training)
        out = self.motion.network({"video": motion})
        return {"rgb": rgb[self.key], "rgb_frames": rgb["video_frames"], "motion": out[self.key],
                "motion_frames": out["video_frames"]}

    def forward(self, embeddings: dict, batch: dict):
        o, T, terms, loss = self.o, self.o.temperature, {}, 0.0
        rgb, motion = embeddings["rgb"].float(), embeddings["motion"].float()  # (B, 2, D), (B, 2 or 4, D)
        pairs = [(motion[:, 0], motion[:, 1])] + ([(motion[:, 2], motion[:, 3])] if o.rotation else [])
        if o.rgb_weight > 0:
            terms["rgb"] = directed_nce(rgb[:, 0], rgb[:, 1], T)
            loss = loss + o.rgb_weight * terms["rgb"]
        if o.motion_weight > 0:
            terms["motion"] = sum(directed_nce(q, k, T) for q, k in pairs)
            loss = loss + o.motion_weight * terms["motion"]
        if o.cross_weight > 0:
            terms["cross"] = sum(directed_nce(rgb[:, 0], k, T) + directed_nce(q, rgb[:, 1], T) for q, k in pairs)
            loss = loss + o.cross_weight * terms["cross"]
        if o.frame_weight > 0:
            frames = embeddings["motion_frames"].float()  # (B, 2 or 4, t, width)
            channels_first = lambda x: x.transpose(1, 2)  # (B, t, width) -> (B, width, t)
            rotated = channels_first(frames[:, 2]) if o.rotation else None
            _, _, terms["frame"] = local_motion_loss(channels_first(embeddings["rgb_frames"][:, 0].float()),
                                                     channels_first(frames[:, 0]), rotated, T)
            loss = loss + o.frame_weight * terms["frame"]
        return loss, {k: v.detach() for k, v in terms.items()}
