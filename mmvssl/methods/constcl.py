"""`constcl`: ConST-CL (Yuan et al. 2022, "Contextualized Spatio-Temporal Contrastive Learning with
Self-Supervision", CVPR): region features of one view predict, through a small transformer decoder
over the other view's tokens (the context), that view's features of the same regions; beside a
clip-level contrastive loss.

- Views (`data.sampler: same`, `data.num_clips: 2`): two augmentations of one window that keep
  its geometry (colour only: crop_area and crop_aspect [1, 1], flip 0), so a box means the same
  place in both views (boxes are not mapped between different crops or flips). `prepare` draws `regions` boxes per clip on the device (sides a share
  `box_scale` of the frame), the same for both views.
- Token grid: the video transformer's token outputs (`video_tokens`, (B, V, t*h*w, width); the
  model's `token_features`), averaged over time into an h x w map per view.
- Region features: torchvision.ops.roi_align of each box on that map (`roi_size` x `roi_size`,
  averaged), (B, V, K, width).
- Context prediction: the regions of view a are the queries of a transformer decoder
  (`decoder_layers` layers) whose memory is view b's tokens; its output, through the method's
  prediction head, is contrasted (InfoNCE at `region_temperature`) with view b's features of the
  same regions through the target head: the positive is the same box of the same clip, the
  negatives every other region of the global batch (gathered across processes). Both directions
  (a, b) = (1, 2), (2, 1), averaged; gradients reach both sides.
- Clip loss: NT-Xent between the two views' `video_<space>` embeddings at `clip_temperature`.
- loss = region_weight * region + clip_weight * clip; a term is on when its weight is positive.

Departures from the paper: the two views share one geometry (ConST-CL relates regions across
different crops, and across time, of a clip; the loader records crops in batch["view_crops"],
but flips are not recorded and boxes are not mapped between crops here); the
regions are random boxes, not detected or tracked objects; the features are the transformer's
tokens averaged over time (one spatial map per view), not a 3-D CNN's spatio-temporal map; the
decoder's depth, heads and the loss weights are this module's (the paper's code, in
tensorflow/models official/projects/const_cl, was not read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.contrastive import global_mean, nt_xent_loss
from ..losses.gather import gather_no_grad, gather_with_grad, world
from .base import BuildContext, Method, mlp


@dataclass
class ConSTCLOptions:
    region_weight: float = 1.0
    clip_weight: float = 1.0
    region_temperature: float = 0.1
    clip_temperature: float = 0.1
    regions: int = 4  # boxes per clip
    box_scale: list[float] = field(default_factory=lambda: [0.3, 0.7])  # each side, share of the frame
    roi_size: int = 2  # roi_align output, averaged to one feature
    decoder_layers: int = 1
    decoder_heads: int = 4
    head_hidden: int = 512
    head_dim: int = 128
    space: str = "ssl"


def random_boxes(batch: int, regions: int, scale: tuple[float, float], device=None) -> torch.Tensor:
    """(batch, regions, 4) boxes [x1, y1, x2, y2] in [0, 1], each side a share in `scale` of the frame."""
    side = torch.empty(batch, regions, 2, device=device).uniform_(*scale)  # (w, h)
    corner = torch.rand(batch, regions, 2, device=device) * (1 - side)
    return torch.cat([corner, corner + side], dim=-1)


def region_features(maps: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """maps (M, C, h, w), boxes (M, K, 4) in [0, 1] -> (M, K, C): roi_align of every box, averaged
    over its size x size bins."""
    from torchvision.ops import roi_align
    M, C, h, w = maps.shape
    K = boxes.shape[1]
    scale = torch.tensor([w, h, w, h], device=maps.device, dtype=maps.dtype)
    index = torch.arange(M, device=maps.device, dtype=maps.dtype).repeat_interleave(K)[:, None]
    rois = torch.cat([index, (boxes.to(maps.dtype) * scale).reshape(M * K, 4)], dim=1)  # (M * K, 5)
    pooled = roi_align(maps, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return pooled.mean(dim=(2, 3)).view(M, K, C)


def region_nce_loss(predicted: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """predicted, target (B, K, D) normalised: InfoNCE of every predicted region against every target
    region of the global batch, the positive its own (clip, box); each process returns its share of
    the global mean (losses/contrastive.py)."""
    B, K, D = predicted.shape
    rank, _ = world()
    candidates = gather_with_grad(target.reshape(B * K, D))  # (N * K, D)
    logits = predicted.reshape(B * K, D) @ candidates.T / temperature
    labels = torch.arange(B * K, device=predicted.device) + rank * B * K
    per_anchor = F.cross_entropy(logits, labels, reduction="none")
    ones = torch.ones_like(per_anchor)
    return global_mean(per_anchor, ones, gather_no_grad(ones))


class ConSTCL(Method):
    name = "constcl"
    paper = "ConST-CL (Yuan et al. 2022): region features of one view predict the other view's context"
    Options = ConSTCLOptions

    def __init__(self, options: ConSTCLOptions, width: int, patch: tuple[int, int, int]):
        super().__init__()
        if options.region_weight <= 0 and options.clip_weight <= 0:
            raise ConfigError("method 'constcl': method.options.region_weight and clip_weight are both 0 (no loss)")
        low, high = options.box_scale
        if not 0 < low <= high <= 1 or options.regions < 1:
            raise ConfigError(f"method 'constcl': method.options.box_scale must be 0 < low <= high <= 1 and regions "
                              f">= 1 (got {options.box_scale}, {options.regions})")
        self.o, self.patch = options, tuple(patch)
        self.key = f"video_{options.space}"
        layer = nn.TransformerDecoderLayer(width, options.decoder_heads, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, options.decoder_layers)
        self.predict_head = mlp(width, options.head_hidden, options.head_dim, batch_norm=True)
        self.target_head = mlp(width, options.head_hidden, options.head_dim, batch_norm=True)
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        from .contrastive import build_student
        options = cls.options(cfg)
        spec, aug = ctx.spec, ctx.spec.augment
        if spec.sampler != "same" or spec.num_clips != 2:
            raise ConfigError(f"method 'constcl' relates regions of two views of one window: data.sampler "
                              f"'{spec.sampler}' with data.num_clips={spec.num_clips} does not give them (use same, 2)")
        if aug.video and (tuple(aug.crop_scale) != (1.0, 1.0) or tuple(aug.crop_ratio) != (1.0, 1.0) or aug.flip > 0):
            raise ConfigError("method 'constcl': boxes are not mapped between crops, so both views must keep the "
                              "frame's geometry (data.augment.crop_area [1, 1], crop_aspect [1, 1], flip 0)")
        net = build_student(cfg, ctx.accelerator)
        encoder = net.encoders["video"]
        if not hasattr(encoder, "patch") or getattr(encoder, "drop_token", 0) > 0:
            raise ConfigError(f"method 'constcl' needs the video transformer's whole token grid: model '{net.name}' "
                              f"has no video transformer, or drops tokens (video.drop_token)")
        net.token_features = True  # forward also returns video_tokens (B, V, N, width)
        return net, cls(options, encoder.width, encoder.patch)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.decoder, self.predict_head, self.target_head]

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        video = batch["video"]  # (B, 2, C, T, H, W)
        boxes = random_boxes(video.shape[0], self.o.regions, tuple(self.o.box_scale), video.device)
        return {**batch, "constcl_boxes": boxes}

    def _head(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(head(x.flatten(0, 1)).view(*x.shape[:2], -1), dim=-1)

    def forward(self, embeddings: dict, batch: dict):
        o, terms, loss = self.o, {}, 0.0
        if o.region_weight > 0:
            tokens = embeddings["video_tokens"].float()  # (B, 2, N, C)
            B, V, N, C = tokens.shape
            T, H, W = batch["video"].shape[-3:]
            t, h, w = T // self.patch[0], H // self.patch[1], W // self.patch[2]
            maps = tokens.view(B, V, t, h, w, C).mean(2).permute(0, 1, 4, 2, 3)  # (B, 2, C, h, w)
            boxes = batch["constcl_boxes"]  # (B, K, 4), the same in both views
            regions = region_features(maps.flatten(0, 1), boxes.repeat_interleave(V, dim=0), o.roi_size)
            regions = regions.view(B, V, -1, C)  # (B, 2, K, C)
            total = 0.0
            for a, b in ((0, 1), (1, 0)):
                context = self.decoder(regions[:, a], tokens[:, b])  # (B, K, C): queries from a, memory b
                total = total + region_nce_loss(self._head(self.predict_head, context),
                                                self._head(self.target_head, regions[:, b]), o.region_temperature)
            terms["region"] = total / 2
            loss = loss + o.region_weight * terms["region"]
        if o.clip_weight > 0:
            clips = embeddings[self.key].float()  # (B, 2, D)
            terms["clip"] = nt_xent_loss(clips[:, 0], clips[:, 1], o.clip_temperature)
            loss = loss + o.clip_weight * terms["clip"]
        return loss, {k: v.detach() for k, v in terms.items()}
