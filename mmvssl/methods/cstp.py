"""`cstp`: CSTP (Zhang et al. 2022, "Contrastive Spatio-Temporal Pretext Learning for
Self-supervised Video Representation"): BYOL between two clips of a video, jointly with three
pretext tasks: the clips' spatio-temporal overlap rate (STOR), their playback rate and a rotation.

- Views (`data.sampler: overlap`, mmvssl.data.sampling.overlapping_pair): two clips of one video whose
  temporal IoU is drawn uniformly in (0, 1], each decoded as `data.num_frames` frames over its window
  and cropped apart (batch["view_crops"]).
- BYOL views (in `prepare`, on the device): each clip at the slowest rate, `keep = T // max(strides)`
  frames at stride max(strides) over its whole window; they carry no rotation and no rate change:
  BYOL (Grill et al. 2020) pulls them together, and the heads that predict rate and rotation never
  read them. online = the model (encoder + projection head, `video_<space>`) + the method's predictor
  (Linear-BN-ReLU-Linear); target = an exponential moving average of the model, no gradient,
  momentum on a cosine from `momentum_start` to `momentum_end` over `train.max_steps`. Loss:
  2 - 2 cos(predictor(online_v), target_w) for (v, w) = (1, 2) and (2, 1), averaged. No negatives.
- Pretext copies (in `prepare`, the view group `video/pretext`, embedded by the model with a forward of
  their own): of each clip, `keep` frames at a stride s drawn per copy from `strides` (s = 1: half the
  playback speed of s = 2) from a random offset o in [0, T - s * keep]; the second copy is also
  rotated by k x 90 degrees, k drawn per clip. A head on each copy's features predicts s
  (cross-entropy over `strides`), a head on the second copy's features predicts k (4-way). Their
  windows [start + o dt, start + (o + s keep) dt) (dt = window / T) and crops are appended to
  batch["view_times"] / ["view_crops"] after the clips' (the group's order).
- Overlap rate (STOR): the target is the temporal IoU of the two BYOL views' windows times the IoU
  of their spatial crops ([x0, y0, x1, y1], a share of the decoded frame; a flip after the crop does
  not change the region). A head on both BYOL views' features ([f1, f2, |f1 - f2|, f1 * f2])
  regresses it through a sigmoid, mean squared error.
- Features of the heads: the video transformer's tokens averaged over space and time
  (`video_frames` averaged over t). loss = byol_weight * byol + overlap_weight * overlap +
  rate_weight * rate + rotation_weight * rotation; a term is on when its weight is positive.

Reference: the official code is public, KT27-A/CSTP @ cd68686 (read for this docstring):
main_byol.py `train_BYOL` (loss = 0.1 BYOL + spatial-overlap CE + temporal-overlap CE + playback CE
on both clips + rotation CE on both clips), data_process/datasets.py `UcfRepreBYOLSpPre` and its
constants (PACE 1/2/4/8, OVERLAP_TEM_RATE 1.0-0.2 in 5 classes, ROTATE 0/90/180/270 per clip),
data_process/preprocess_data.py (OVERLAP_SPA_RATE 1.0-0.2 in 5 classes). This module does not follow
it where docs/methods.md says so: upstream's BYOL views *are* the rotated, rate-changed clips (one
rate for both, a rotation drawn per clip), where here they are untransformed and the transformations
go to copies that only the pretext heads see (the issue's reading of the paper); overlap is one
regressed product of temporal and spatial IoU (upstream: two 5-way classifications); the rate has
`strides` (upstream 4 classes), rotation is predicted on one copy (upstream on both clips); the
weights are this config's (upstream 0.1 for BYOL, 1 for each pretext term), and BYOL's two terms are
averaged where upstream sums them (models/pace/r21d_byol.py `_cal_loss`), and the target's momentum
follows a cosine where upstream keeps 0.996. Playback rate is made on the device by temporal subsampling of a
decoded clip, so configs decode max(strides) x the model's frames. The model's
projection output is L2-normalised before the predictor (the model normalises every embedding),
where BYOL's projector output is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..modalities import group_key
from .base import BuildContext, Method, cosine_schedule, ema_update, frozen_copy, mlp, require_output, unwrap
from .contrastive import build_student
from .views import box_iou, temporal_iou, view_crops, view_windows


@dataclass
class CSTPOptions:
    byol_weight: float = 1.0
    overlap_weight: float = 1.0
    rate_weight: float = 1.0
    rotation_weight: float = 1.0
    strides: list[int] = field(default_factory=lambda: [1, 2])  # playback rates (temporal strides) to tell apart
    momentum_start: float = 0.99  # target EMA momentum, cosine to momentum_end over train.max_steps (BYOL: 0.996)
    momentum_end: float = 1.0
    predictor_hidden: int = 512
    head_hidden: int = 256  # the pretext heads: Linear-ReLU-Linear
    space: str = "ssl"


def subsample_views(video: torch.Tensor, stride: torch.Tensor, offset: torch.Tensor, keep: int) -> torch.Tensor:
    """video (B, V, C, T, H, W); stride, offset (B, V) -> (B, V, C, keep, H, W): frames
    offset + stride * [0, keep) of each view."""
    B, V, C, T, H, W = video.shape
    index = offset[..., None] + stride[..., None] * torch.arange(keep, device=video.device)  # (B, V, keep)
    return video.gather(3, index[:, :, None, :, None, None].expand(B, V, C, keep, H, W))


def rotate_views(video: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """video (B, C, T, H, W) with H == W, k (B,) in 0..3 -> each clip rotated by k x 90 degrees."""
    out = video.clone()
    for turns in range(1, 4):
        chosen = k == turns
        if chosen.any():
            out[chosen] = torch.rot90(video[chosen], turns, dims=(-2, -1))
    return out


def byol_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """online (B, 2, D) predictions, target (B, 2, D), both normalised: the mean over clips of
    (2 - 2 cos(online_1, target_2) + 2 - 2 cos(online_2, target_1)) / 2."""
    return (2 - (online[:, 0] * target[:, 1]).sum(-1) - (online[:, 1] * target[:, 0]).sum(-1)).mean()


class CSTP(Method):
    name = "cstp"
    views_on_device = True  # `mmvssl views` runs prepare: the BYOL views and the pretext copies are made here
    paper = "CSTP (Zhang et al. 2022): BYOL with overlap-rate, playback-rate and rotation prediction"
    Options = CSTPOptions

    def __init__(self, student: nn.Module, options: CSTPOptions, num_frames: int, max_steps: int):
        super().__init__()
        strides = sorted(set(options.strides))
        if not strides or strides[0] < 1 or num_frames // strides[-1] < 1:
            raise ConfigError(f"method 'cstp': method.options.strides must be positive and at most data.num_frames "
                              f"({num_frames}); got {options.strides}")
        weights = (options.byol_weight, options.overlap_weight, options.rate_weight, options.rotation_weight)
        if max(weights) <= 0:
            raise ConfigError("method 'cstp': every loss weight is 0 (no loss)")
        self.o, self.max_steps, self.num_frames = options, max_steps, num_frames
        self.strides, self.keep = strides, num_frames // strides[-1]
        self.key = f"video_{options.space}"
        dims = student.output_dims()
        width = dims["video_frames"]
        self.predictor = mlp(dims[self.key], options.predictor_hidden, dims[self.key], batch_norm=True)
        self.overlap_head = mlp(4 * width, options.head_hidden, 1)
        self.rate_head = mlp(width, options.head_hidden, len(strides))
        self.rotation_head = mlp(width, options.head_hidden, 4)
        self.target = frozen_copy(student)
        self.target.frame_features = False  # the target gives only the BYOL embedding
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # for the momentum schedule, checkpointed
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        if ctx.spec.sampler not in ("overlap", "cvrl"):
            raise ConfigError(f"method 'cstp' predicts the overlap of two clips of a video: data.sampler "
                              f"'{ctx.spec.sampler}' does not give them (use overlap)")
        net = build_student(cfg, ctx.accelerator)
        require_output(net, f"video_{options.space}", cls.name)
        net.frame_features = True  # forward also returns video_frames (B, V, t, width): the pretext features
        return net, cls(net, options, ctx.spec.num_frames, cfg.train.max_steps)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.predictor, self.overlap_head, self.rate_head, self.rotation_head]

    def momentum(self, step: int) -> float:
        return cosine_schedule(self.o.momentum_start, self.o.momentum_end, step, self.max_steps)

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """The BYOL views (each clip at the slowest rate) in `video`, the pretext copies (playback rate,
        rotation) in `video/pretext`; their labels and the overlap target (B,) added to the batch."""
        video = batch["video"]  # (B, 2, C, T, H, W)
        B, V, T, device = video.shape[0], video.shape[1], video.shape[3], video.device
        if V != 2 or T != self.num_frames:
            raise ConfigError(f"method 'cstp' expects 2 views of {self.num_frames} frames, got {tuple(video.shape)}")
        windows = view_windows(batch, device)[:, :2]  # (B, 2, 2) the clips' windows
        crops = view_crops(batch, device)[:, :2]  # (B, 2, 4), read before the video is replaced
        slowest = torch.full((B, V), self.strides[-1], device=device)
        byol = subsample_views(video, slowest, torch.zeros_like(slowest), self.keep)  # the whole window each
        rate = torch.randint(len(self.strides), (B, V), device=device)  # label: index into strides
        stride = torch.tensor(self.strides, device=device)[rate]  # (B, V)
        offset = (torch.rand(B, V, device=device) * (T - stride * self.keep + 1)).long()  # in [0, T - s * keep]
        copies = subsample_views(video, stride, offset, self.keep)
        rotation = torch.randint(4, (B,), device=device)
        copies = torch.stack([copies[:, 0], rotate_views(copies[:, 1], rotation)], dim=1)
        dt = (windows[..., 1] - windows[..., 0]) / T
        start = windows[..., 0] + offset * dt
        covered = torch.stack([start, start + stride * self.keep * dt], dim=-1)  # (B, 2, 2) the copies' windows
        overlap = temporal_iou(windows[:, 0], windows[:, 1]) * box_iou(crops[:, 0], crops[:, 1])  # (B,)
        out = {**batch, "video": byol, group_key("video", "pretext"): copies, "cstp_rate": rate,
               "cstp_stride": stride, "cstp_rotation": rotation, "cstp_overlap": overlap}
        out["view_times"] = torch.cat([windows, covered], 1).to(batch["view_times"].dtype)  # clips, then copies
        out["view_crops"] = torch.cat([crops, crops], 1)
        return out

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = model({"video": batch["video"]})
        pretext = model({"video": batch[group_key("video", "pretext")]})["video_frames"]  # (B, 2, t, width)
        with torch.no_grad():
            self.target.train(model.training)
            target = self.target({"video": batch["video"]})[self.key]  # (B, 2, D)
        return {self.key: out[self.key], "video_frames": out["video_frames"], "pretext_frames": pretext,
                "target": target}

    def forward(self, embeddings: dict, batch: dict):
        o, terms, loss = self.o, {}, 0.0
        if o.byol_weight > 0:
            online = embeddings[self.key].float()  # (B, 2, D)
            online = F.normalize(self.predictor(online.flatten(0, 1)).view(online.shape), dim=-1)
            terms["byol"] = byol_loss(online, embeddings["target"].detach().float())
            loss = loss + o.byol_weight * terms["byol"]
        features = embeddings["video_frames"].float().mean(dim=2)  # (B, 2, width): the BYOL views
        pretext = embeddings["pretext_frames"].float().mean(dim=2)  # (B, 2, width): the transformed copies
        if o.overlap_weight > 0:
            f1, f2 = features[:, 0], features[:, 1]
            predicted = torch.sigmoid(self.overlap_head(torch.cat([f1, f2, (f1 - f2).abs(), f1 * f2], -1)))[:, 0]
            terms["overlap"] = F.mse_loss(predicted, batch["cstp_overlap"].float())
            loss = loss + o.overlap_weight * terms["overlap"]
        if o.rate_weight > 0:
            terms["rate"] = F.cross_entropy(self.rate_head(pretext.flatten(0, 1)), batch["cstp_rate"].flatten())
            loss = loss + o.rate_weight * terms["rate"]
        if o.rotation_weight > 0:
            terms["rotation"] = F.cross_entropy(self.rotation_head(pretext[:, 1]), batch["cstp_rotation"])
            loss = loss + o.rotation_weight * terms["rotation"]
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        self.step.fill_(step)
        ema_update(self.target, unwrap(model), self.momentum(step - 1))  # the step just taken

    def log_values(self) -> dict[str, float]:
        return {"momentum": self.momentum(int(self.step))}
