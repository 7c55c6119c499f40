"""`tg`: semi-supervised video recognition from RGB and its temporal gradient (TG; Xiao et al., CVPR
2022, "Learning from Temporal Gradient for Semi-supervised Action Recognition").

Follows the official code, https://github.com/lambert-x/video-semisup at commit
17cc13c85a91e048fb4912c686aa06de3bf11c78: the UCF101 main config
`configs/ucf101_main/r3d_r18_8x8x1_180e_ucf101_rgb_offlinetg_20percent_align0123_1clip_cosine_weak_sameclip_precisebn_ptv_new_loss_half.py`,
the recognizer `mmaction/models/recognizers/recognizer3d_semi_appsup_tempsup_simclr_crossclip_ptv.py`
(defaults in `base_semi_apppearance_temporal_simclr.py`), the temporal gradient of
`tools/data/build_rawframes_temporal_gradient.py` and `mmaction/datasets/pipelines/custom_temporal.py`,
and the losses `mmaction/models/losses/simclr_loss_ptv_new.py` and `cosine_simi_loss.py`.
`temporal_gradient_uint8`, `crossview_contrast_loss` and `feature_alignment_loss` reproduce the official
numbers of tests/data/parity/tg (tests/parity/tg.py).

Two streams, each a video encoder with a classifier head: the RGB stream is the model (what is
saved), the TG stream lives in the method (trained, checkpointed, not shipped). Its input is the
temporal gradient between *consecutive decoded frames*: for every sampled frame, uint8((frame -
next frame + 255) / 2) (the loader decodes the next source frame, `video_next`, cropped and
flipped with it), normalised as RGB. Per batch (weak view: the loader's crop and flip; strong view:
pseudo_label.strong_augment, drawn separately for RGB and TG):

- labelled samples: 0.5 x cross-entropy of each stream on the weak view (`cls_loss_weight`);
- unlabelled samples (FixMatch), from step `unlabelled_warmup` on (the official 30 of 180 epochs):
  softmax of the mean of both streams' weak-view logits; where its maximum reaches `threshold`
  (0.3, every official config), its argmax supervises both streams' strong views, 0.5 x CE summed
  over the confident samples / all unlabelled samples;
- RGB-TG contrast (`crossview_sameclip` over the weak views of every clip): each stream's pooled
  feature through its own ContrastHead (3 bias-free linears, BN, ReLU, final BN without affine),
  0.5 x (CE(rgb -> tg) + CE(tg -> rgb)) at temperature 0.5, negatives the other clips of the other
  stream gathered over processes;
- alignment: 1 - cosine between the streams' features, the TG side detached (`align_stop_grad: tg`).

Logged: `pseudo_label_share`, the share of this step's unlabelled samples whose pseudo-label passed
the threshold (counted during the warm-up too, when it trains nothing).

Departures (docs/methods.md lists them with reasons): one alignment point (the pooled feature)
instead of the four ResNet stages; the strong view is made on the device (colour, greyscale,
cutout) instead of imgaug's RandAugment; labelled and unlabelled samples share one stream
(`data.labelled_share`) instead of two loaders at 1:1; BatchNorm in the heads is per process
(SyncBN upstream); the warm-up is counted in steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..data.loader import VIDEO_MEAN, VIDEO_STD, normalize_video
from ..errors import ConfigError
from ..losses.contrastive import global_mean
from ..losses.gather import gather_with_grad, world
from .base import BuildContext, Method
from .pseudo_label import (build_semi, confident_pseudo_labels, labelled_cross_entropy, masked_cross_entropy,
                           strong_augment, weak_and_strong)


@dataclass
class TGOptions:
    task: str = ""  # eval/tasks/X.yaml or a task name: the classes and the label key
    pretrained: str = ""  # a model folder for the RGB stream; empty: model.preset at random initialisation
    threshold: float = 0.3  # FixMatch's confidence threshold (fixmatch_threshold of every official config)
    labelled_weight: float = 0.5  # cls_loss_weight.labeled, per stream
    unlabelled_weight: float = 0.5  # cls_loss_weight.unlabeled, per stream
    unlabelled_warmup: int = 0  # steps before the unlabelled loss applies (officially 30 of 180 epochs)
    align_weight: float = 1.0  # cross-modal feature alignment (RGB towards stop-grad TG)
    contrast_weight: float = 1.0  # contrast_loss_weight of the RGB-TG term
    contrast_temperature: float = 0.5
    jitter: float = 0.4  # strong view: colour jitter strength
    grayscale: float = 0.2
    cutout: float = 0.5  # side of the cutout square, share of the frame
    val_shards: str = ""
    eval_every: int = 0
    eval_clips: int = 1
    eval_crops: int = 1


def temporal_gradient_uint8(frames: torch.Tensor, next_frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames and the frames right after them (same shape) -> uint8((frame - next + 255) / 2),
    computed in float32 and truncated: the official TG (earlier minus later; no motion gives 127)."""
    if frames.shape != next_frames.shape or frames.dtype != torch.uint8 or next_frames.dtype != torch.uint8:
        raise ValueError(f"temporal_gradient_uint8 expects two uint8 tensors of one shape, got "
                         f"{tuple(frames.shape)} {frames.dtype} and {tuple(next_frames.shape)} {next_frames.dtype}")
    return ((frames.float() - next_frames.float() + 255.0) / 2.0).to(torch.uint8)


def normalise_frames(frames: torch.Tensor, mean, std, channel_dim: int = 0) -> torch.Tensor:
    """uint8 (or float) pixels -> (x - mean) / std per channel along `channel_dim` (TG is normalised
    with the RGB mean and std, `Normalize_Diff(raw_to_diff=False)`)."""
    shape = [1] * frames.ndim
    shape[channel_dim] = -1
    mean = torch.as_tensor(mean, dtype=torch.float32, device=frames.device).view(shape)
    std = torch.as_tensor(std, dtype=torch.float32, device=frames.device).view(shape)
    return (frames.float() - mean) / std


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Frames normalised by the loader (VIDEO_MEAN / VIDEO_STD) -> their uint8 pixels (exact: the
    normalisation moves a pixel by far less than half a level)."""
    mean, std = VIDEO_MEAN.to(video.device), VIDEO_STD.to(video.device)  # (3, 1, 1, 1): channel before T, H, W
    return ((video.float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def tg_input(video: torch.Tensor, video_next: torch.Tensor) -> torch.Tensor:
    """The TG stream's input (..., 3, T, H, W) from the loader's normalised frames and the frames
    right after them: the official uint8 TG, normalised as the loader normalises RGB."""
    return normalize_video(temporal_gradient_uint8(to_uint8(video), to_uint8(video_next)))


def crossview_contrast_loss(rgb: torch.Tensor, tg: torch.Tensor, temperature: float = 0.5, weight: float = 0.5
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official RGB-TG term (SimCLRLoss_PTV_New) on embeddings (N, D) of the same clips:
    weight x (CE(rgb -> tg) + CE(tg -> rgb)), each an InfoNCE of L2-normalised rows at `temperature`
    whose negatives are the other clips of the other stream, gathered over processes. Returns
    (loss, CE rgb -> tg, CE tg -> rgb), each CE this process's share of the mean over every process's
    rows (contrastive.global_mean: DDP's gradient averaging makes it exact; one process: the mean)."""
    a, b = F.normalize(rgb.float(), dim=1), F.normalize(tg.float(), dim=1)
    rank, _ = world()
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    ones = torch.ones(a.shape[0], device=a.device)
    all_ones = torch.ones(all_a.shape[0], device=a.device)
    ab = global_mean(F.cross_entropy(a @ all_b.T / temperature, labels, reduction="none"), ones, all_ones)
    ba = global_mean(F.cross_entropy(b @ all_a.T / temperature, labels, reduction="none"), ones, all_ones)
    return weight * (ab + ba), ab, ba


def feature_alignment_loss(rgb: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
    """The official CosineSimiLoss on features (N, C, ...) of one stage: 1 - the mean over every
    position of the cosine over channels, the TG side detached (`align_stop_grad: tg`)."""
    a = F.normalize(rgb.float(), dim=1)
    b = F.normalize(tg.detach().float(), dim=1)
    return 1 - F.cosine_similarity(a, b, dim=1).mean()


def contrast_head(width: int) -> nn.Sequential:
    """The official ContrastHead after global pooling: Linear-BN-ReLU, Linear-BN-ReLU, Linear, BN
    without affine; no linear has a bias (width -> width)."""
    return nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                         nn.Linear(width, width, bias=False), nn.BatchNorm1d(width, affine=False))


class TG(Method):
    name = "tg"
    paper = ("TG (Xiao et al., CVPR 2022): RGB + temporal-gradient streams, FixMatch pseudo-labels, "
             "RGB-TG contrast and feature alignment")
    Options = TGOptions

    def __init__(self, options: TGOptions, tg_net, width: int | None = None):
        super().__init__()
        self.opt = options
        self.tg_net = tg_net  # the temporal-gradient stream: trained here, checkpointed, not shipped
        width = width or tg_net.head.in_features
        self.rgb_head, self.tg_head = contrast_head(width), contrast_head(width)  # trained, not shipped
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # the warm-up's clock, checkpointed
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        net, method = build_semi(cls, cfg, ctx, lambda options: cfg)  # TG stream: model.preset, random init
        if method.opt.unlabelled_warmup < 0:
            raise ConfigError(f"method.options.unlabelled_warmup must be >= 0 steps, got "
                              f"{method.opt.unlabelled_warmup} (method 'tg')")
        if ctx.spec is not None:
            ctx.spec.next_frames = True  # the loader decodes the frame after each sampled one (video_next)
        return net, method

    def decayed_modules(self):
        return [self.tg_net, self.rgb_head, self.tg_head]

    def prepare(self, batch: dict) -> dict:
        """video (B, 2, C, T, H, W) weak and strong RGB, tgrad the same for the temporal gradient of
        consecutive decoded frames (its strong view drawn apart from RGB's), labels (B,)."""
        if "video_next" not in batch:
            raise ConfigError("method 'tg' takes the temporal gradient between consecutive decoded frames: the "
                              "batch has no 'video_next' (the loader gives it when SampleSpec.next_frames is set)")
        tg = tg_input(batch["video"], batch["video_next"])  # (B, C, T, H, W)
        out = weak_and_strong(self, {k: v for k, v in batch.items() if k != "video_next"})
        o = self.opt
        out["tgrad"] = torch.stack([tg, strong_augment(tg, o.jitter, o.grayscale, o.cutout)], dim=1)
        return out

    def embed(self, model, batch: dict) -> dict:
        rgb = model(batch)  # logits (B, 2, K), pooled (B, 2, width): weak, strong
        tg = self.tg_net({"video": batch["tgrad"]})
        return {"rgb_logits": rgb["logits"], "rgb_pooled": rgb["pooled"],
                "tg_logits": tg["logits"], "tg_pooled": tg["pooled"],
                "rgb_contrast": self.rgb_head(rgb["pooled"][:, 0]), "tg_contrast": self.tg_head(tg["pooled"][:, 0])}

    def forward(self, embeddings: dict, batch: dict):
        o = self.opt
        labels = batch["labels"]  # (B,)
        rgb, tg = embeddings["rgb_logits"].float(), embeddings["tg_logits"].float()  # (B, 2, K)
        supervised = o.labelled_weight * (labelled_cross_entropy(rgb[:, 0], labels)
                                          + labelled_cross_entropy(tg[:, 0], labels))
        unlabelled = labels < 0
        with torch.no_grad():
            probs = ((rgb[unlabelled, 0] + tg[unlabelled, 0]) / 2).softmax(dim=-1)  # the reference's 'avg'
            pseudo, confident = confident_pseudo_labels(probs, o.threshold)
        pseudo_loss = o.unlabelled_weight * (masked_cross_entropy(rgb[unlabelled, 1], pseudo, confident)
                                             + masked_cross_entropy(tg[unlabelled, 1], pseudo, confident))
        active = int(self.steps_done) >= o.unlabelled_warmup  # the official cur_epoch >= warmup_epoch
        align = feature_alignment_loss(embeddings["rgb_pooled"][:, 0], embeddings["tg_pooled"][:, 0])
        contrast, rgb_to_tg, tg_to_rgb = crossview_contrast_loss(embeddings["rgb_contrast"], embeddings["tg_contrast"],
                                                                 o.contrast_temperature)
        loss = (supervised + (pseudo_loss if active else 0.0 * pseudo_loss) + o.align_weight * align
                + o.contrast_weight * contrast)
        n_unlabelled = int(unlabelled.sum())
        share = confident.float().sum() / max(1, n_unlabelled)
        return loss, {"ce_labelled": supervised.detach(), "ce_pseudo": pseudo_loss.detach() if active else
                      torch.zeros((), device=loss.device), "align": align.detach(), "contrast": contrast.detach(),
                      "pseudo_label_share": share.to(loss.device),
                      "unlabelled": torch.tensor(float(n_unlabelled), device=loss.device),
                      "labelled": (labels >= 0).float().sum()}

    @torch.no_grad()
    def after_step(self, model, step: int) -> None:
        self.steps_done.fill_(step)
        self.validation(model, step)

    def log_values(self) -> dict[str, float]:
        return dict(self.validation.last)
