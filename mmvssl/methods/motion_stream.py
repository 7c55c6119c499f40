"""The motion stream of the motion-aware methods (MaCLR, CoCLR, MSCL, MCL, STC-Mix): which motion
input a method reads (`method.options.motion`), and the network that encodes it.

- `tgrad`: the temporal gradient (mmvssl.data.motion), computed on the device between consecutive
  decoded frames of the source video, as the papers take it (video-semisup's TG: frame idx minus
  frame idx + 1 of the raw video): a method that reads `tgrad` asks the loader for the frame right
  after each sampled frame (`SampleSpec.next_frames` -> batch `video_next`, cropped, flipped and
  colour-augmented with its frame), and tgrad[t] = video_next[t] - video[t]: 3 channels, T frames.
  It needs no storage and follows the RGB view's crop and flip by construction. A batch without
  `video_next` (built by hand, not by the loader) falls back to differences of the sampled frames.
- `flow`: the cached optical flow of the sampled frames (`mmvssl shards add-flow`), the batch's
  `flow` entry: 2 channels (dx, dy), one field per sampled frame, the same leading shape as `video`.

The motion network is a second MultimodalModel of the student's preset with `video.in_channels`
set to the motion input's channels. It lives in the method: trained with the model (its weight
matrices decayed as the model's), checkpointed in the method's state (`method.safetensors`), never
shipped: the saved model is the RGB network alone, as the papers evaluate it.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig
from torch import nn

from ..config import to_dict
from ..data.motion import temporal_gradient
from ..errors import ConfigError
from ..modalities import MOTION_CHANNELS
from ..models.multimodal import MultimodalModel
from ..models.presets import apply_overrides, load_preset
from .contrastive import sampling_of


def check_motion(kind: str, method: str) -> int:
    """The channels of motion input `kind`; a one-line ConfigError naming the option otherwise."""
    if kind not in MOTION_CHANNELS:
        raise ConfigError(f"method.options.motion: method '{method}' reads tgrad or flow, got '{kind}'")
    return MOTION_CHANNELS[kind]


def check_motion_data(kind: str, spec, method: str) -> None:
    """`flow` needs the loader to put cached flow in the batch (data.flow, shards from add-flow);
    `tgrad` asks it for consecutive frames (spec.next_frames: the frame after each sampled frame)."""
    if kind == "tgrad" and hasattr(spec, "next_frames"):
        spec.next_frames = True
    if kind == "flow" and not getattr(spec, "flow", False):
        raise ConfigError(f"method '{method}': method.options.motion=flow reads the cached optical flow: set "
                          f"data.flow=true and train on shards made by `mmvssl shards add-flow`")


def build_same_window_student(cls, cfg: DictConfig, ctx, options, purpose: str) -> nn.Module:
    """The student of a motion method that reads two augmentations of one window (coclr, mscl, mcl,
    stcmix): data.sampler same with 2 clips (a one-line error saying the method's `purpose`
    otherwise), the motion input available, and the student's `video_<options.space>`."""
    from .base import require_output
    from .contrastive import build_student
    spec = ctx.spec
    if spec.sampler != "same" or spec.num_clips != 2:
        raise ConfigError(f"method '{cls.name}' {purpose}: data.sampler '{spec.sampler}' with "
                          f"data.num_clips={spec.num_clips} does not give them (use same with data.num_clips=2)")
    check_motion_data(options.motion, spec, cls.name)
    net = build_student(cfg, ctx.accelerator)
    require_output(net, f"video_{options.space}", cls.name)
    return net


def build_motion_network(cfg: DictConfig, kind: str, method: str, channels: int | None = None) -> MultimodalModel:
    """The motion pathway: `model.preset` + `model.overrides` with `video.in_channels` set for
    `kind` (the student's architecture, as CoCLR's two S3Ds and MaCLR's two pathways), or to
    `channels` when the method derives its own input from `kind` (MaCLR's flow edges: 1)."""
    channels = channels or check_motion(kind, method)
    preset = apply_overrides(load_preset(cfg.model.preset), to_dict(cfg.model.overrides))
    if "video" not in preset:
        raise ConfigError(f"method '{method}': model.preset '{cfg.model.preset}' has no video encoder")
    preset = copy.deepcopy(preset)
    for modality in ("audio", "text"):
        preset.pop(modality, None)  # the motion pathway encodes motion only
    preset["video"]["in_channels"] = channels
    preset["name"] = f"{preset.get('name', cfg.model.preset)}-{kind}"
    preset["sampling"] = sampling_of(cfg)
    return MultimodalModel(preset)


def motion_input(batch: dict, kind: str) -> torch.Tensor:
    """The motion clip(s) of `batch` with the video's leading shape: (B, [V,] C_m, T, H, W)."""
    video = batch["video"]
    if kind == "tgrad":  # consecutive decoded frames when the loader gave them (video_next)
        return temporal_gradient(video, batch.get("video_next"))
    if "flow" not in batch:
        raise ConfigError("method.options.motion=flow: the batch has no 'flow' entry (train on shards made by "
                          "`mmvssl shards add-flow`, with the loader's flow pairing on)")
    flow = batch["flow"]
    expected = (*video.shape[:-4], 2, *video.shape[-3:])
    if tuple(flow.shape) != expected:
        raise ConfigError(f"batch['flow'] has shape {tuple(flow.shape)}; the motion stream expects {expected} "
                          f"(the video's {tuple(video.shape)} with 2 flow channels)")
    return flow.to(video.dtype)


def motion_modalities(kind: str) -> set[str]:
    """The batch inputs a method with motion input `kind` reads (the engine moves only these)."""
    return {"video", "flow"} if kind == "flow" else {"video"}


class MotionPathway(nn.Module):
    """Holds the motion network; `embed(batch, train)` -> its `video_<space>` of every view."""

    def __init__(self, network: MultimodalModel, kind: str, key: str):
        super().__init__()
        self.network, self.kind, self.key = network, kind, key

    def forward(self, batch: dict, training: bool) -> torch.Tensor:
        self.network.train(training)
        return self.network({"video": motion_input(batch, self.kind)})[self.key]
