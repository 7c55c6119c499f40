"""`mscl`: MSCL (Ni et al., ECCV 2022, "Motion Sensitive Contrastive Learning for Self-supervised
Video Representation"): contrast between RGB and motion at the level of clips and of frames,
rotated motion as extra negatives, and training clips chosen for their motion.

As implemented:
- Views (`data.sampler: same` with 2 clips): two augmentations of one window. The RGB stream (the
  model) sees view 0; the motion stream (a network of the same architecture, owned by the method;
  mmvssl/methods/motion_stream.py) sees the motion of view 1: its frame differences (`motion:
  tgrad`) or its cached optical flow (`motion: flow`). Both views cover the same times, so frame t
  of one is frame t of the other.
- Motion differential sampling (MDS), on the device in `prepare`: the loader decodes
  `data.num_frames` frames; with `keep_share` < 1 each clip keeps that share of them, the run of
  consecutive frames (the same for both views) whose motion energy, the mean |frame difference| of
  view 0 (or mean flow magnitude with `motion: flow`), is largest.
- Clip level: InfoNCE from each RGB clip to the motion clips of the global batch, its own motion
  clip positive, plus the *rotated* motion clips (flow rotation augmentation, FRA): every clip's
  motion turned by k x 90 degrees (k in 1..3 drawn per clip; the field's grid rotated and, for
  flow, its vectors with it, `rotate_motion`) enters as an extra negative, so matching the RGB clip
  needs the direction of its motion, not only its amount. The motion -> RGB direction (without
  rotated candidates) is added, as in symmetric InfoNCE.
- Frame level (local motion contrastive learning, LMCL): the encoders' per-frame features
  (`video_frames`, tokens averaged per temporal position) go through a frame head per stream; RGB
  frame t of clip i and motion frame t of clip i are positives, every other frame of every clip in
  the global batch (other times of the same clip included) a negative; symmetric.
- loss = clip_weight * clip + frame_weight * frame. The saved model is the RGB stream.

Departures from the paper: MSCL computes TV-L1 flow and samples clips with large flow magnitude
from the whole video; here the motion is frame differences (or cached OpenCV flow) and MDS picks
the most moving sub-window inside the decoded window (the loader samples the window). The
backbone is the config's preset (the paper: S3D/R(2+1)D), negatives come from the global batch
rather than a memory bank, and frame-level features are the transformer's per-time token means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.gather import gather_with_grad, world
from .base import BuildContext, Method, mlp
from .motion_stream import (MotionPathway, build_motion_network, build_same_window_student, check_motion, motion_input,
                            motion_modalities)


@dataclass
class MSCLOptions:
    motion: str = "tgrad"  # tgrad (frame differences, on the device) or flow (cached by `shards add-flow`)
    clip_weight: float = 1.0
    frame_weight: float = 1.0
    rotation_negatives: bool = True  # FRA: each clip's rotated motion as an extra negative
    keep_share: float = 1.0  # MDS: keep this share of the decoded frames, the most moving run (1: all, no MDS)
    frame_head_hidden: int = 256
    temperature: float = 0.1
    space: str = "ssl"


def rotate_motion(x: torch.Tensor, k: torch.Tensor, kind: str) -> torch.Tensor:
    """x (B, C, T, H, W) with H == W, k (B,) quarter turns -> each clip turned by k x 90 degrees as
    torch.rot90 turns its frames (dims H, W). For flow (C = 2: dx, dy in pixels, x right, y down) the
    vectors turn with the grid: one turn maps (dx, dy) to (dy, -dx)."""
    out = x.clone()
    for turns in range(1, 4):
        chosen = k == turns
        if not chosen.any():
            continue
        turned = torch.rot90(x[chosen], turns, dims=(-2, -1))
        if kind == "flow":
            dx, dy = turned[:, 0], turned[:, 1]
            for _ in range(turns):
                dx, dy = dy, -dx
            turned = torch.stack([dx, dy], dim=1)
        out[chosen] = turned
    return out


def motion_energy(batch: dict, kind: str) -> torch.Tensor:
    """(B, T) motion of view 0 from frame t to t + 1: mean |frame difference| (tgrad) or mean flow
    magnitude (flow field t: frame t -> t + 1)."""
    if kind == "flow":
        return batch["flow"][:, 0].float().norm(dim=1).mean(dim=(-2, -1))
    return motion_input(batch, "tgrad")[:, 0].float().abs().mean(dim=(1, 3, 4))


def most_moving_start(energy: torch.Tensor, keep: int) -> torch.Tensor:
    """energy (B, T), frame t's motion towards frame t + 1 -> (B,) the start s of the `keep`
    consecutive frames whose motion inside them (steps s .. s + keep - 2) is largest; the earliest
    on ties."""
    if keep < 2:
        return energy.argmax(dim=1)
    windows = energy[:, :-1].unfold(1, keep - 1, 1).sum(-1)  # (B, T - keep + 1)
    return windows.argmax(dim=1)


def local_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between frame features a, b (B, t, D), normalised: a[i, t] and b[i, t] are
    positives; every other frame of the global batch a negative. Each process computes its own rows."""
    B, t, D = a.shape
    rank, _ = world()
    fa, fb = a.reshape(B * t, D), b.reshape(B * t, D)
    all_a, all_b = gather_with_grad(fa), gather_with_grad(fb)
    labels = torch.arange(B * t, device=a.device) + rank * B * t
    return 0.5 * (F.cross_entropy(fa @ all_b.T / temperature, labels)
                  + F.cross_entropy(fb @ all_a.T / temperature, labels))


def clip_nce(rgb: torch.Tensor, motion: torch.Tensor, rotated: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """RGB clip i against every motion clip (and every rotated one, negatives only), its own motion
    positive; plus motion clip i against every RGB clip. rgb, motion, rotated (B, D) normalised."""
    B = rgb.shape[0]
    rank, _ = world()
    labels = torch.arange(B, device=rgb.device) + rank * B
    all_motion, all_rgb = gather_with_grad(motion), gather_with_grad(rgb)
    candidates = all_motion if rotated is None else torch.cat([all_motion, gather_with_grad(rotated)])
    return 0.5 * (F.cross_entropy(rgb @ candidates.T / temperature, labels)
                  + F.cross_entropy(motion @ all_rgb.T / temperature, labels))


class MSCL(Method):
    name = "mscl"
    paper = "MSCL (Ni et al. 2022): clip- and frame-level RGB-motion contrast, rotated motion negatives, motion sampling"
    Options = MSCLOptions

    def __init__(self, student: nn.Module, motion_network: nn.Module, options: MSCLOptions, num_frames: int):
        super().__init__()
        check_motion(options.motion, self.name)
        if max(options.clip_weight, options.frame_weight) <= 0:
            raise ConfigError("method 'mscl': every loss weight is 0 (no loss)")
        if not 0 < options.keep_share <= 1:
            raise ConfigError(f"method 'mscl': method.options.keep_share must be in (0, 1], got {options.keep_share}")
        self.o, self.key, self.num_frames = options, f"video_{options.space}", num_frames
        self.keep = max(1, round(num_frames * options.keep_share))
        self.motion = MotionPathway(motion_network, options.motion, self.key)
        dims, width = student.output_dims(), student.output_dims()["video_frames"]
        self.rgb_frame_head = mlp(width, options.frame_head_hidden, dims[self.key])
        self.motion_frame_head = mlp(motion_network.output_dims()["video_frames"], options.frame_head_hidden,
                                     dims[self.key])
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
        return [self.motion.network, self.rgb_frame_head, self.motion_frame_head]

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """MDS: both views (and their flow) cut to the most moving share of the frames (keep_share)."""
        video = batch["video"]  # (B, 2, C, T, H, W)
        if video.ndim != 6 or video.shape[1] != 2 or video.shape[3] != self.num_frames:
            raise ConfigError(f"method 'mscl' expects 2 views of {self.num_frames} frames, got {tuple(video.shape)}")
        if self.o.rotation_negatives and video.shape[-1] != video.shape[-2]:
            raise ConfigError(f"method 'mscl' rotates motion by quarter turns: frames must be square, got "
                              f"{video.shape[-2]}x{video.shape[-1]}")
        out = dict(batch)
        keep = self.keep
        if keep < self.num_frames:
            start = most_moving_start(motion_energy(batch, self.o.motion), keep)  # (B,)
            index = start[:, None] + torch.arange(keep, device=video.device)  # (B, keep)
            for name in ("video", "flow"):
                if name in batch:
                    x = batch[name]  # (B, 2, C, T, H, W)
                    out[name] = x.gather(3, index[:, None, None, :, None, None].expand(
                        *x.shape[:3], keep, *x.shape[4:]))
            out["mscl_start"] = start
        return out

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        rgb = model({"video": batch["video"][:, 0]})
        motion_batch = {k: batch[k][:, 1] for k in ("video", "flow") if k in batch}
        motion = motion_input(motion_batch, self.o.motion)  # (B, C_m, T, H, W)
        if self.o.rotation_negatives:  # quarter turns drawn here: feature-cached accumulation replays the RNG
            turns = torch.randint(1, 4, (motion.shape[0],), device=motion.device)
            motion = torch.stack([motion, rotate_motion(motion, turns, self.o.motion)], dim=1)
        self.motion.network.train(model.training)
        out = self.motion.network({"video": motion})  # (B, [2,] D) and frames (B, [2,] t, width)
        return {"rgb": rgb[self.key], "rgb_frames": rgb["video_frames"], "motion": out[self.key],
                "motion_frames": out["video_frames"]}

    def forward(self, embeddings: dict, batch: dict):
        o, terms, loss = self.o, {}, 0.0
        rgb, motion = embeddings["rgb"].float(), embeddings["motion"].float()
        motion_frames = embeddings["motion_frames"].float()
        rotated = None
        if o.rotation_negatives:
            motion, rotated, motion_frames = motion[:, 0], motion[:, 1], motion_frames[:, 0]
        if o.clip_weight > 0:
            terms["clip"] = clip_nce(rgb, motion, rotated, o.temperature)
            loss = loss + o.clip_weight * terms["clip"]
        if o.frame_weight > 0:
            a = F.normalize(self.rgb_frame_head(embeddings["rgb_frames"].float()), dim=-1)  # (B, t, D)
            b = F.normalize(self.motion_frame_head(motion_frames), dim=-1)
            terms["frame"] = local_nce(a, b, o.temperature)
            loss = loss + o.frame_weight * terms["frame"]
        return loss, {k: v.detach() for k, v in terms.items()}
