"""`mcl`: MCL (Li et al., ICCV 2021, "Motion-Focused Contrastive Learning of Video
Representations"): contrastive learning whose clips are sampled where the video moves, and whose
RGB encoder is taught to attend where it moves: its Grad-CAM is aligned with the motion map.

As implemented:
- Views (`data.sampler: same` with 2 clips): two augmentations of one window, contrasted with
  NT-Xent over the global batch (the model: encoder + projection head `video_<space>`).
- Motion map: per view and frame, the magnitude of its motion: |frame differences| summed over the
  colour channels (`motion: tgrad`, from the view's own frames) or the cached optical flow's
  magnitude (`motion: flow`).
- Motion-focused sampling, on the device in `prepare`: temporally, each clip keeps `keep_share` of
  the decoded frames, the most moving run (both views alike; mscl.most_moving_start); spatially,
  each view keeps the square box of `crop_share` x its side whose summed motion is largest,
  resized back to the clip's size (bilinear), its motion map with it.
- Motion-focused feature learning: Grad-CAM of the RGB encoder at the input of its last
  transformer block (the patch tokens A, (B V, N, width), that the aggregation token reads):
  weights alpha = mean over tokens of d(contrastive loss)/dA, map = ReLU(sum_c alpha_c A_c), on the
  token grid (t, h, w). The motion map is averaged over each token's tubelet. Both maps are divided
  by their maximum per view, and the alignment loss is their mean squared difference. The gradient
  is taken with create_graph, so the alignment trains the encoder through the Grad-CAM itself.
- loss = NT-Xent + align_weight * alignment. The saved model is the RGB encoder; MCL has no motion
  network (motion only shapes the sampling and the target map).

Departures from the paper: MCL trains with MoCo, computes TV-L1 flow, samples tubelets from
the whole video and aligns Grad-CAM of 3-D CNN feature maps in space and time separately; here
the contrast is in-batch NT-Xent, motion is frame differences (or cached OpenCV flow), sampling
works inside the decoded window, and Grad-CAM is taken on the transformer's patch tokens before the
last block with one spatio-temporal map. Feature-cached accumulation (train.accum_steps > 1)
is refused: Grad-CAM needs the graph from the loss back to the tokens in one pass. Attention runs
on the math kernel (the fused ones have no double backward), slower on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data.motion import temporal_gradient
from ..errors import ConfigError
from ..losses.contrastive import nt_xent_loss
from .base import BuildContext, Method, unwrap
from .motion_stream import build_same_window_student, check_motion, motion_modalities
from .mscl import most_moving_start


@dataclass
class MCLOptions:
    motion: str = "tgrad"  # tgrad (frame differences, on the device) or flow (cached by `shards add-flow`)
    align_weight: float = 1.0
    keep_share: float = 1.0  # temporal focus: the most moving run of this share of the decoded frames (1: all)
    crop_share: float = 1.0  # spatial focus: the most moving square box of this share of the side (1: all)
    temperature: float = 0.1
    space: str = "ssl"


def motion_magnitude(batch: dict, kind: str) -> torch.Tensor:
    """(B, V, T, H, W) motion of every view and frame (frame t towards t + 1)."""
    if kind == "flow":
        return batch["flow"].float().norm(dim=-4)
    return temporal_gradient(batch["video"].float()).abs().sum(dim=-4)


def focus_boxes(motion: torch.Tensor, side: int) -> torch.Tensor:
    """motion (N, T, H, W) -> (N, 2) the top-left (y, x) of the side x side box with the largest
    summed motion (the earliest in row-major order on ties)."""
    total = motion.sum(dim=1, keepdim=True)  # (N, 1, H, W)
    windows = F.avg_pool2d(total, side, stride=1)[:, 0]  # (N, H - side + 1, W - side + 1)
    best = windows.flatten(1).argmax(dim=1)
    return torch.stack([best // windows.shape[-1], best % windows.shape[-1]], dim=1)


def crop_resize(x: torch.Tensor, corners: torch.Tensor, side: int, size: int) -> torch.Tensor:
    """x (N, C, T, H, W), corners (N, 2) -> (N, C, T, size, size): each box resized (bilinear)."""
    out = []
    for clip, (y, x0) in zip(x, corners.tolist()):
        box = clip[..., y:y + side, x0:x0 + side]  # (C, T, side, side)
        out.append(F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False))
    return torch.stack(out)


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) over tokens: activations, gradients (N, L, C) -> (N, L),
    ReLU(sum_c alpha_c A_c) with alpha = the gradient averaged over the L tokens."""
    alpha = gradients.mean(dim=1, keepdim=True)  # (N, 1, C)
    return F.relu((activations * alpha).sum(dim=-1))


def alignment_loss(cam: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two maps (N, ...) after dividing each by its maximum."""
    def unit(m):
        flat = m.flatten(1)
        return flat / flat.max(dim=1, keepdim=True).values.clamp(min=1e-6)
    return F.mse_loss(unit(cam), unit(motion))


class MCL(Method):
    name = "mcl"
    paper = "MCL (Li et al. 2021): motion-focused clip sampling and Grad-CAM aligned with the motion map"
    Options = MCLOptions

    def __init__(self, student: nn.Module, options: MCLOptions, num_frames: int):
        super().__init__()
        check_motion(options.motion, self.name)
        if not 0 < options.keep_share <= 1 or not 0 < options.crop_share <= 1:
            raise ConfigError(f"method 'mcl': method.options.keep_share and crop_share must be in (0, 1], got "
                              f"{options.keep_share}, {options.crop_share}")
        encoder = student.encoders["video"]
        if not hasattr(encoder, "transformer") or not len(encoder.transformer.blocks):
            raise ConfigError(f"method 'mcl' takes Grad-CAM at the last transformer block of the video encoder: "
                              f"model '{student.name}' has none (use a transformer preset, e.g. video-tiny)")
        self.o, self.key, self.num_frames = options, f"video_{options.space}", num_frames
        self.patch = tuple(encoder.patch)
        self.keep = max(1, round(num_frames * options.keep_share))
        self.modalities = motion_modalities(options.motion)
        self.__dict__["captured"] = None  # the hook's activations of the last forward

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        net = build_same_window_student(cls, cfg, ctx, options, "contrasts two augmentations of a window")
        if cfg.train.accum_steps > 1:
            raise ConfigError("method 'mcl': train.accum_steps > 1 is not supported (Grad-CAM needs the graph from "
                              "the loss to the encoder's tokens in one pass)")
        return net, cls(net, options, ctx.spec.num_frames)

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """Motion-focused sampling in time and space; the motion map on the token grid (B, 2, t, h, w)."""
        video = batch["video"]  # (B, 2, C, T, H, W)
        if video.ndim != 6 or video.shape[1] != 2 or video.shape[3] != self.num_frames:
            raise ConfigError(f"method 'mcl' expects 2 views of {self.num_frames} frames, got {tuple(video.shape)}")
        B, V, _, T, H, W = video.shape
        out = dict(batch)
        motion = motion_magnitude(batch, self.o.motion)  # (B, 2, T, H, W)
        if self.keep < T:
            start = most_moving_start(motion[:, 0].mean(dim=(-2, -1)), self.keep)  # (B,)
            index = start[:, None] + torch.arange(self.keep, device=video.device)  # (B, keep)
            for name in ("video", "flow"):
                if name in out:
                    x = out[name]
                    out[name] = x.gather(3, index[:, None, None, :, None, None].expand(*x.shape[:3], self.keep,
                                                                                     *x.shape[4:]))
            motion = motion.gather(2, index[:, None, :, None, None].expand(B, V, self.keep, H, W))
            out["mcl_start"] = start
        side = max(1, round(min(H, W) * self.o.crop_share))
        if side < min(H, W):
            corners = focus_boxes(motion.flatten(0, 1), side)  # (B * 2, 2)
            for name in ("video", "flow"):
                if name in out:
                    x = out[name]
                    out[name] = crop_resize(x.flatten(0, 1), corners, side, H).view(*x.shape[:4], H, H)
            motion = crop_resize(motion.flatten(0, 1)[:, None], corners, side, H)[:, 0].view(B, V, -1, H, H)
            out["mcl_corners"] = corners.view(B, V, 2)
        pt, ph, pw = self.patch
        pooled = F.avg_pool3d(motion.flatten(0, 1)[:, None], (pt, ph, pw))[:, 0]  # (B * 2, t, h, w): per tubelet
        out["mcl_motion"] = pooled.unflatten(0, (B, V))
        return out

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The views' embeddings and the patch tokens entering the last transformer block (hooked)."""
        block = unwrap(model).encoders["video"].transformer.blocks[-1]
        captured = []
        handle = block.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            # the math attention kernel: the fused ones (flash, memory-efficient) have no double
            # backward, which the Grad-CAM alignment (a gradient of a gradient) takes
            with sdpa_kernel(SDPBackend.MATH):
                out = model({"video": batch["video"]})
        finally:
            handle.remove()
        self.__dict__["captured"] = captured[-1]  # (B * 2, 1 + N, width), in the graph
        return {self.key: out[self.key]}

    def forward(self, embeddings: dict, batch: dict):
        z = embeddings[self.key].float()  # (B, 2, D)
        contrast = nt_xent_loss(z[:, 0], z[:, 1], self.o.temperature)
        terms = {"nt_xent": contrast.detach()}
        loss = contrast
        if self.o.align_weight > 0 and torch.is_grad_enabled():
            tokens = self.captured[:, 1:]  # (B * 2, N, width): the aggregation token dropped
            gradients = torch.autograd.grad(contrast, self.captured, create_graph=True)[0][:, 1:]
            motion = batch["mcl_motion"].flatten(0, 1).float()  # (B * 2, t, h, w)
            cam = grad_cam(tokens.float(), gradients.float()).view_as(motion)
            terms["align"] = alignment_loss(cam, motion)
            loss = loss + self.o.align_weight * terms["align"]
        return loss, {k: v.detach() for k, v in terms.items()}
