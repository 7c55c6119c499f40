"""`cstp`: CSTP (Zhang et al. 2022, "Contrastive Spatio-Temporal Pretext Learning for
Self-supervised Video Representation"): BYOL between two clips of a video, jointly with four
pretext classifications: the clips' temporal overlap, their spatial overlap, their playback rate and
each clip's rotation. It follows the official code, KT27-A/CSTP @ cd68686 (file and line below).

- Clips (`data.sampler: overlap`, mmvssl.data.sampling.overlapping_pair, as data_process/datasets.py
  `UcfRepreBYOLSpPre.repre_train_clip`): one playback rate r for both clips, uniform among
  cstp_rates(data.long_scale) whose span fits the video (upstream PACE = [1, 2, 4, 8], datasets.py
  line 17, `pb_label = random.randint(0, min(3, max_pb))`); each clip is data.num_frames frames over
  r x num_frames / fps seconds. The second clip is shifted (1 - share) of the span before or after the
  first, share = CSTP_OVERLAP_SHARES[k] = 1.0 ... 0.2 (OVERLAP_TEM_RATE, datasets.py line 18), k uniform.
- Crops (`data.augment.crop_overlap`, mmvssl.data.augment.overlapping_crop, as
  data_process/preprocess_data.py `ClipRandomSizedCropOverlap`): the first a random resized crop of
  area 0.2-1, the second of the same size overlapping it by a share (OVERLAP_SPA_RATE,
  preprocess_data.py line 18) of its area, drawn uniformly.
- Rotation (in `prepare`, on the device): each clip rotated by k_v x 90 degrees, k_v uniform in 0..3
  per clip (datasets.py ROTATE, line 19, `rot_label_1`, `rot_label_2`).
- BYOL on these very clips, rotated and at their rate (main_byol.py line 60: `model(clip_1, clip_2)`):
  online = the model (encoder + projection head, `video_<space>`) + the predictor (Linear-BN-ReLU-Linear,
  models/pace/r21d_byol.py `Predictor`); target = an exponential moving average of the model with a
  constant momentum 0.996 (r21d_byol.py `R21DBYOL(momentum=0.996)`, `_update_target_net`), no
  gradient. Loss per clip pair: (2 - 2 cos(q_1, z'_2)) + (2 - 2 cos(q_2, z'_1)), the two directions
  summed (r21d_byol.py `_cal_loss`: loss_one + loss_two), averaged over the batch.
- Pretext labels, read back in `prepare` from where the loader put the views: the temporal class from
  the share of the first clip's window the second covers, the spatial class from the share of the
  first crop's area the second covers (each the nearest of the drawn shares: exact for the shares
  the sampler and the augmentation draw), the rate class from the clips' length / (num_frames / fps).
- Heads (r21d_byol.py `R21DBYOL.__init__`, `forward` for o_type "loss_com"): on the encoder's pooled
  features f_v (the video transformer's tokens averaged over space and time, before the projection
  head), each Linear-BN-ReLU-Linear with a hidden width equal to its input: the spatial and the
  temporal head on [f_1, f_2] (5 classes each), the rate head and the rotation head on f_1 and f_2
  alike, each clip its own cross-entropy.
- loss = 0.1 byol + 1 spatial + 1 temporal + 1 (rate_1 + rate_2) + 1 (rotation_1 + rotation_2)
  (main_byol.py lines 62-73, with the README's `--loss_weight 0.1 1 1 1 1`); a term is on when its
  weight is positive.

Where this still differs (docs/methods.md "differs from the reference" lists each with its reason):
the backbone is mmvssl's video transformer (upstream R(2+1)D-10 / S3D / R3D), its projection output is
L2-normalised before the predictor; the target starts as a copy of the online network (upstream builds
it as a second, independently initialised network); the rate and rotation heads have as many outputs
as classes (upstream 5, with labels 0..3); rotation turns the square crop on the device (upstream turns
the frame before cropping); upstream's appearance augmentation (rotation by +-10 degrees, jitter, channel
split, blur, all at once with p 0.3 per clip) is approximated by independent transforms with those
marginal probabilities (configs/methods/cstp.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..data.sampling import CSTP_OVERLAP_SHARES, cstp_rates
from ..errors import ConfigError
from .base import BuildContext, Method, ema_update, frozen_copy, mlp, require_output, unwrap
from .contrastive import build_student
from .views import view_crops, view_windows


@dataclass
class CSTPOptions:
    byol_weight: float = 0.1  # upstream --loss_weight 0.1 1 1 1 1 (README), main_byol.py loss_total
    spatial_weight: float = 1.0
    temporal_weight: float = 1.0
    rate_weight: float = 1.0  # on each clip
    rotation_weight: float = 1.0  # on each clip
    momentum: float = 0.996  # the target's EMA momentum, constant (r21d_byol.py R21DBYOL)
    predictor_hidden: int = 512  # upstream 4096 beside a 512-wide encoder
    space: str = "ssl"


def nearest_class(share: torch.Tensor, shares) -> torch.Tensor:
    """share (...) -> (...) long: the index of the nearest of `shares` (bin edges at their midpoints)."""
    table = torch.tensor(shares, device=share.device, dtype=share.dtype)
    return (share[..., None] - table).abs().argmin(-1)


def temporal_share(windows: torch.Tensor) -> torch.Tensor:
    """windows (B, 2, 2) [start, end] -> (B,): the share of the first clip's window the second covers."""
    inter = (torch.minimum(windows[:, 0, 1], windows[:, 1, 1]) - torch.maximum(windows[:, 0, 0], windows[:, 1, 0]))
    return inter.clamp(min=0) / (windows[:, 0, 1] - windows[:, 0, 0]).clamp(min=1e-9)


def spatial_share(crops: torch.Tensor) -> torch.Tensor:
    """crops (B, 2, 4) [x0, y0, x1, y1] -> (B,): the share of the first crop's area the second covers."""
    a, b = crops[:, 0], crops[:, 1]
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    return w * h / ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])).clamp(min=1e-9)


def rotate_views(video: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """video (B, V, C, T, H, W) with H == W, k (B, V) in 0..3 -> each view rotated by k x 90 degrees."""
    out = video.clone()
    for turns in range(1, 4):
        chosen = k == turns
        if chosen.any():
            out[chosen] = torch.rot90(video[chosen], turns, dims=(-2, -1))
    return out


def byol_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """online (B, 2, D) predictions, target (B, 2, D), both normalised: the mean over clips of
    (2 - 2 cos(online_1, target_2)) + (2 - 2 cos(online_2, target_1)), the directions summed."""
    return (4 - 2 * (online[:, 0] * target[:, 1]).sum(-1) - 2 * (online[:, 1] * target[:, 0]).sum(-1)).mean()


class CSTP(Method):
    name = "cstp"
    views_on_device = True  # `mmvssl views` runs prepare: the rotations are made here
    paper = "CSTP (Zhang et al. 2022): BYOL with overlap, playback-rate and rotation classification"
    Options = CSTPOptions

    def __init__(self, student: nn.Module, options: CSTPOptions, window: float, rates: list[int],
                 crop_shares=CSTP_OVERLAP_SHARES):
        super().__init__()
        weights = (options.byol_weight, options.spatial_weight, options.temporal_weight, options.rate_weight,
                   options.rotation_weight)
        if max(weights) <= 0:
            raise ConfigError("method 'cstp': every loss weight is 0 (no loss)")
        if not 0.0 <= options.momentum <= 1.0:
            raise ConfigError(f"method 'cstp': method.options.momentum must lie in [0, 1], got {options.momentum}")
        self.o, self.window, self.rates, self.crop_shares = options, window, list(rates), tuple(crop_shares)
        self.key = f"video_{options.space}"
        dims = student.output_dims()
        width = dims["video_frames"]
        self.predictor = mlp(dims[self.key], options.predictor_hidden, dims[self.key], batch_norm=True)
        self.spatial_head = mlp(2 * width, 2 * width, len(self.crop_shares), batch_norm=True)
        self.temporal_head = mlp(2 * width, 2 * width, len(CSTP_OVERLAP_SHARES), batch_norm=True)
        self.rate_head = mlp(width, width, len(self.rates), batch_norm=True)
        self.rotation_head = mlp(width, width, 4, batch_norm=True)
        self.target = frozen_copy(student)
        self.target.frame_features = False  # the target gives only the BYOL embedding
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        spec = ctx.spec
        if spec.sampler != "overlap":
            raise ConfigError(f"method 'cstp' predicts the overlap of two clips of a video: data.sampler "
                              f"'{spec.sampler}' does not draw them as CSTP does (use overlap)")
        if options.spatial_weight > 0 and not (spec.augment.video and spec.augment.crop_overlap):
            raise ConfigError("method 'cstp' predicts the overlap of the clips' crops: set data.augment.video: true "
                              "and data.augment.crop_overlap (CSTP: [1.0, 0.8, 0.6, 0.4, 0.2])")
        net = build_student(cfg, ctx.accelerator)
        require_output(net, f"video_{options.space}", cls.name)
        net.frame_features = True  # forward also returns video_frames (B, V, t, width): the heads' features
        return net, cls(net, options, spec.window, cstp_rates(spec.long_scale),
                        spec.augment.crop_overlap or CSTP_OVERLAP_SHARES)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.predictor, self.spatial_head, self.temporal_head, self.rate_head, self.rotation_head]

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """Each clip rotated by its label; the labels (cstp_rotation (B, 2), cstp_rate, cstp_temporal,
        cstp_spatial (B,)) read from the views' windows and crops and added to the batch."""
        video = batch["video"]  # (B, 2, C, T, H, W)
        B, device = video.shape[0], video.device
        if video.shape[1] != 2 or video.shape[-1] != video.shape[-2]:
            raise ConfigError(f"method 'cstp' expects 2 views of square frames, got {tuple(video.shape)}")
        windows = view_windows(batch, device)[:, :2]  # (B, 2, 2)
        crops = view_crops(batch, device)[:, :2]  # (B, 2, 4)
        rotation = torch.randint(4, (B, 2), device=device)
        rates = torch.tensor(self.rates, device=device, dtype=torch.float32) * self.window
        return {**batch, "video": rotate_views(video, rotation), "cstp_rotation": rotation,
                "cstp_rate": nearest_class(windows[:, 0, 1] - windows[:, 0, 0], rates.tolist()),
                "cstp_temporal": nearest_class(temporal_share(windows), CSTP_OVERLAP_SHARES),
                "cstp_spatial": nearest_class(spatial_share(crops), self.crop_shares)}

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = model({"video": batch["video"]})
        with torch.no_grad():
            self.target.train(model.training)
            target = self.target({"video": batch["video"]})[self.key]  # (B, 2, D)
        return {self.key: out[self.key], "video_frames": out["video_frames"], "target": target}

    def forward(self, embeddings: dict, batch: dict):
        o, terms, loss = self.o, {}, 0.0
        if o.byol_weight > 0:
            online = embeddings[self.key].float()  # (B, 2, D)
            online = F.normalize(self.predictor(online.flatten(0, 1)).view(online.shape), dim=-1)
            terms["byol"] = byol_loss(online, embeddings["target"].detach().float())
            loss = loss + o.byol_weight * terms["byol"]
        features = embeddings["video_frames"].float().mean(dim=2)  # (B, 2, width): pooled, before the projection
        pair = features.flatten(1)  # (B, 2 width): [f_1, f_2]
        for name, head, weight in (("spatial", self.spatial_head, o.spatial_weight),
                                   ("temporal", self.temporal_head, o.temporal_weight)):
            if weight > 0:
                terms[name] = F.cross_entropy(head(pair), batch[f"cstp_{name}"])
                loss = loss + weight * terms[name]
        labels = {"rate": batch["cstp_rate"][:, None].expand(-1, 2), "rotation": batch["cstp_rotation"]}  # (B, 2)
        for name, head, weight in (("rate", self.rate_head, o.rate_weight),
                                   ("rotation", self.rotation_head, o.rotation_weight)):
            if weight > 0:  # the head on each clip by itself (its BatchNorm too), one cross-entropy each, summed
                terms[name] = sum(F.cross_entropy(head(features[:, v]), labels[name][:, v]) for v in range(2))
                loss = loss + weight * terms[name]
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        ema_update(self.target, unwrap(model), self.o.momentum)

    def log_values(self) -> dict[str, float]:
        return {"momentum": self.o.momentum}
