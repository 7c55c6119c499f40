"""`constcl`: ConST-CL (Yuan et al. 2022, "Contextualized Spatio-Temporal Contrastive Learning with
Self-Supervision", CVPR): instance features of one view, contextualised by a small transformer decoder
over the other view's tokens, predict the other view's instance features; beside a clip-level
contrastive loss. Follows the official code, tensorflow/models official/projects/const_cl:
losses/losses.py (`InstanceContrastiveLoss`, `ContrastiveLoss`), datasets/video_ssl_inputs.py (the
instance boxes), modeling/const_cl_model.py and modeling/heads/instance_reconstructor.py.

- Views (`data.sampler: cvrl`, as official/projects/video_ssl which ConST-CL's input pipeline
  extends): two clips of one video at CVRL's gap, each with its own random resized crop and flip, so
  the views differ in time and in space.
- Instances (`prepare`, on the device): `regions` boxes per view, drawn independently in each view's
  own frame as video_ssl_inputs.py `_generate_random_positions` does: corner uniform in [0, 1]^2,
  width uniform in `box_width`, height = width x U[`box_aspect`], clipped at 1 - 1e-3. Boxes are not
  mapped between views: the loss matches instances by their features (below).
- Token grid: the video transformer's token outputs (`video_tokens`, (B, V, t*h*w, width); the
  model's `token_features`), averaged over time into an h x w map per view.
- Instance features: torchvision.ops.roi_align of each box on its view's map (`roi_size` x
  `roi_size`, averaged), (B, V, K, width); through the target head they are the targets.
- Context prediction: the instances of view a are the queries of a transformer decoder
  (`decoder_layers` layers) whose memory is view b's tokens; its output, through the prediction
  head, is contrasted (InfoNCE at `region_temperature`) with view b's targets: the positive of
  instance i is view b's instance most similar to it (argmax over the same clip's targets of
  t_a[i] . t_b[j], InstanceContrastiveLoss's `similarity_ab`: a -> b takes the argmax over b, b -> a
  over a); the negatives are every instance of every other clip of the global batch (gathered
  across processes): the same clip's other instances are left out. Both directions averaged.
- Clip loss: NT-Xent between the two views' `video_<space>` embeddings at `clip_temperature`
  (ContrastiveLoss: each view against the other's and its own side's other clips).
- loss = region_weight * region + clip_weight * clip; a term is on when its weight is positive.

Departures from the official code: the features are the transformer's tokens averaged over time (one
spatial map per view) where ConST-CL pools a 3-D ResNet's res5 map per frame with per-frame boxes;
the decoder's depth, heads and widths are this config's; ContrastiveLoss sums its two directions
(loss_a + loss_b) where nt_xent averages them (clip_weight 2 gives the official scale); the region
loss's positive logit stays in its own column (as the official code) and is not also among the
negatives.
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
    regions: int = 4  # instances (boxes) per view
    box_width: list[float] = field(default_factory=lambda: [0.1, 0.5])  # share of the frame (video_ssl_inputs.py)
    box_aspect: list[float] = field(default_factory=lambda: [0.5, 2.0])  # height / width
    roi_size: int = 2  # roi_align output, averaged to one feature
    decoder_layers: int = 1
    decoder_heads: int = 4
    head_hidden: int = 512
    head_dim: int = 128
    space: str = "ssl"


def random_boxes(shape: tuple[int, ...], width: tuple[float, float], aspect: tuple[float, float],
                 device=None) -> torch.Tensor:
    """(*shape, 4) boxes [x1, y1, x2, y2] in [0, 1): ConST-CL's random instances (video_ssl_inputs.py):
    corner uniform in [0, 1]^2, width uniform in `width`, height width x U[aspect], clipped at 1 - 1e-3."""
    corner = torch.rand(*shape, 2, device=device)  # (x1, y1)
    w = torch.empty(*shape, device=device).uniform_(*width)
    h = w * torch.empty(*shape, device=device).uniform_(*aspect)
    far = torch.minimum(corner + torch.stack([w, h], -1), torch.tensor(1.0 - 1e-3, device=device))
    return torch.cat([corner, far], dim=-1)


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


def instance_nce_loss(predicted: torch.Tensor, target: torch.Tensor, positive: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """predicted, target (B, K, D) normalised, positive (B, K) indices into the same clip's K targets:
    for every predicted instance, InfoNCE whose logits are [its positive target] + every target of
    every other clip of the global batch (the same clip's instances are not negatives: ConST-CL's
    `batch_masks`); the mean over instances, each process its share (losses/contrastive.py)."""
    B, K, D = predicted.shape
    rank, _ = world()
    candidates = gather_with_grad(target.reshape(B * K, D))  # (N * K, D)
    matched = target.gather(1, positive[..., None].expand(B, K, D))  # (B, K, D)
    pos = (predicted * matched).sum(-1).reshape(B * K, 1) / temperature
    neg = predicted.reshape(B * K, D) @ candidates.T / temperature  # (B * K, N * K)
    own_clip = (torch.arange(B, device=predicted.device) + rank * B).repeat_interleave(K)  # (B * K,)
    column_clip = torch.arange(candidates.shape[0], device=predicted.device) // K  # (N * K,)
    neg = neg.masked_fill(own_clip[:, None] == column_clip[None, :], float("-inf"))
    per_anchor = torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]
    ones = torch.ones_like(per_anchor)
    return global_mean(per_anchor, ones, gather_no_grad(ones))


class ConSTCL(Method):
    name = "constcl"
    views_on_device = True  # `mmvssl views` runs prepare: the instance boxes are drawn here
    paper = "ConST-CL (Yuan et al. 2022): instance features of one view, in the other's context, predict its instances"
    Options = ConSTCLOptions

    def __init__(self, options: ConSTCLOptions, width: int, patch: tuple[int, int, int]):
        super().__init__()
        if options.region_weight <= 0 and options.clip_weight <= 0:
            raise ConfigError("method 'constcl': method.options.region_weight and clip_weight are both 0 (no loss)")
        low, high = options.box_width
        if not 0 < low <= high <= 1 or not 0 < options.box_aspect[0] <= options.box_aspect[1] or options.regions < 1:
            raise ConfigError(f"method 'constcl': method.options.box_width must be 0 < low <= high <= 1, box_aspect "
                              f"0 < low <= high and regions >= 1 (got {options.box_width}, {options.box_aspect}, "
                              f"{options.regions})")
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
        spec = ctx.spec
        if spec.sampler != "cvrl":
            raise ConfigError(f"method 'constcl' relates instances of two clips of a video: data.sampler "
                              f"'{spec.sampler}' does not give them (use cvrl, as ConST-CL's video_ssl input)")
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
        boxes = random_boxes(tuple(video.shape[:2]) + (self.o.regions,), tuple(self.o.box_width),
                             tuple(self.o.box_aspect), video.device)
        return {**batch, "constcl_boxes": boxes}  # (B, 2, K, 4), each view's own

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
            boxes = batch["constcl_boxes"]  # (B, 2, K, 4), each in its view's frame
            regions = region_features(maps.flatten(0, 1), boxes.flatten(0, 1), o.roi_size).view(B, V, -1, C)
            targets = [self._head(self.target_head, regions[:, v]) for v in range(2)]  # (B, K, D) each
            similarity = torch.einsum("bid,bjd->bij", targets[0], targets[1]).detach()  # (B, K_a, K_b)
            positives = {(0, 1): similarity.argmax(2), (1, 0): similarity.argmax(1)}  # most similar instance
            total = 0.0
            for a, b in ((0, 1), (1, 0)):
                context = self.decoder(regions[:, a], tokens[:, b])  # (B, K, C): queries from a, memory b
                total = total + instance_nce_loss(self._head(self.predict_head, context), targets[b],
                                                  positives[(a, b)], o.region_temperature)
            terms["region"] = total / 2
            loss = loss + o.region_weight * terms["region"]
        if o.clip_weight > 0:
            clips = embeddings[self.key].float()  # (B, 2, D)
            terms["clip"] = nt_xent_loss(clips[:, 0], clips[:, 1], o.clip_temperature)
            loss = loss + o.clip_weight * terms["clip"]
        return loss, {k: v.detach() for k, v in terms.items()}
