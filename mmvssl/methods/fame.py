"""`fame`: FAME (Ding et al. 2022, "Motion-aware Contrastive Video Representation Learning via
Foreground-background Merging", CVPR): the moving foreground of a clip is pasted onto another
video's background, and the merged clip and an ordinary view of the source are positives, so the
representation cannot lean on the static background.

As implemented (all on the device, in `prepare`, on the decoded and augmented views):
- Views (`data.sampler: same` with 2 clips, or `cvrl`): view 0 becomes the merged clip, view 1 is
  the source's other augmentation, its positive.
- Foreground seeds from frame differences: per pixel and frame, motion m_t = |x_{t+1} - x_t| +
  |x_t - x_{t-1}| summed over the colour channels (the temporal gradient, mmvssl.data.motion, of
  the frames entering and leaving t); the seeds are the `seed_ratio` share of a clip's pixels with
  the largest m (and m > 0).
- Colour statistics: every pixel's colour (un-normalised to [0, 1]) is quantised to
  `colour_bins`^3 bins; a clip's colour histogram over its seeds gives P(colour | foreground), over
  the other pixels P(colour | background). A pixel is foreground when P(c | fg) > P(c | bg): the
  inside of a moving object (whose differences are small) joins its moving edges, and background
  uncovered by the motion (in the seeds, but of the background's colours) leaves them. The mask is
  per frame: (B, T, H, W).
- Merging: merged_i = mask_i * x_i + (1 - mask_i) * x_j, with j = (i + s) mod B, s drawn from 1..B-1
  per batch (every clip gets another video's background). A clip without motion (no seed) keeps its
  own frames (mask 1): there is no foreground to move.
- Loss: NT-Xent between the merged view and the other view over the global batch (negatives:
  every other clip, merged or not; the clip whose background was borrowed is one of them).

Departures from the paper: FAME trains with MoCo (a key encoder and a queue of 16k negatives); this
module uses in-batch NT-Xent as the project's SimCLR does (the mechanism under test is the merging,
and the demo batches are small). The paper merges before augmenting; here the views are merged
after the loader's per-view augmentation (the loader does not expose raw frames), so the merged
clip carries the source's crop in the foreground and the other clip's crop in the background. The
colour model is the histogram likelihood test described above (FAME's code was not available to
read); the seed ratio and bins are this module's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ..data.loader import VIDEO_MEAN, VIDEO_STD
from ..data.motion import temporal_gradient
from ..errors import ConfigError
from ..losses.contrastive import nt_xent_loss
from .base import BuildContext, Method, require_output
from .contrastive import build_student


@dataclass
class FAMEOptions:
    seed_ratio: float = 0.1  # share of a clip's pixels (all frames) taken as foreground seeds by frame differences
    colour_bins: int = 8  # per channel: 8^3 colours in the histograms
    temperature: float = 0.1
    space: str = "ssl"


def motion_map(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T, H, W): |x_{t+1} - x_t| + |x_t - x_{t-1}| summed over channels
    (missing neighbours at the ends count 0)."""
    forward = temporal_gradient(video).abs().sum(dim=1)  # (B, T, H, W): frame t -> t + 1, 0 at the last
    backward = torch.zeros_like(forward)
    backward[:, 1:] = forward[:, :-1]  # frame t - 1 -> t
    return forward + backward


def colour_index(video: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, 3, T, H, W) normalised frames -> (B, T, H, W) long: the quantised colour of each pixel."""
    mean, std = VIDEO_MEAN.to(video.device, video.dtype), VIDEO_STD.to(video.device, video.dtype)
    rgb = (video * std + mean).clamp(0, 1)  # (B, 3, T, H, W) in [0, 1]
    q = (rgb * bins).long().clamp(max=bins - 1)
    return (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]


@torch.no_grad()
def foreground_mask(video: torch.Tensor, seed_ratio: float, bins: int) -> torch.Tensor:
    """FAME's foreground of each clip (B, 3, T, H, W) -> (B, T, H, W) float in {0, 1} (see the module
    docstring): motion seeds refined by colour statistics; 1 everywhere for a clip without motion."""
    B = video.shape[0]
    motion = motion_map(video.float()).flatten(1)  # (B, N), N = T * H * W
    N = motion.shape[1]
    k = max(1, min(N, math.ceil(seed_ratio * N)))
    threshold = motion.topk(k, dim=1).values[:, -1:]  # (B, 1): the k-th largest motion
    seeds = (motion >= threshold) & (motion > 0)  # (B, N)
    colours = colour_index(video.float(), bins).flatten(1)  # (B, N)
    offset = torch.arange(B, device=video.device)[:, None] * bins ** 3
    flat = (colours + offset).flatten()
    fg = torch.bincount(flat, weights=seeds.flatten().float(), minlength=B * bins ** 3).view(B, -1)
    bg = torch.bincount(flat, weights=(~seeds).flatten().float(), minlength=B * bins ** 3).view(B, -1)
    p_fg = fg / fg.sum(dim=1, keepdim=True).clamp(min=1)  # (B, bins^3) P(colour | foreground)
    p_bg = bg / bg.sum(dim=1, keepdim=True).clamp(min=1)
    mask = (p_fg.gather(1, colours) > p_bg.gather(1, colours)).float()  # (B, N)
    still = ~seeds.any(dim=1)  # no motion at all: keep the clip as it is
    mask[still] = 1.0
    return mask.view(B, *video.shape[2:])


def merge(source: torch.Tensor, background: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """source, background (B, C, T, H, W), mask (B, T, H, W) -> the source's foreground pixels on
    the background clip's other pixels."""
    m = mask[:, None].to(source.dtype)
    return m * source + (1 - m) * background


class FAME(Method):
    name = "fame"
    paper = "FAME (Ding et al. 2022): foreground (frame differences + colour) merged onto another video's background"
    Options = FAMEOptions

    def __init__(self, options: FAMEOptions):
        super().__init__()
        if not 0 < options.seed_ratio <= 1 or options.colour_bins < 2:
            raise ConfigError(f"method 'fame': method.options.seed_ratio must be in (0, 1] and colour_bins >= 2 "
                              f"(got {options.seed_ratio}, {options.colour_bins})")
        self.o, self.key = options, f"video_{options.space}"
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        views = ctx.spec.num_clips if ctx.spec.sampler == "same" else 2 if ctx.spec.sampler == "cvrl" else 0
        if views != 2:
            raise ConfigError(f"method 'fame' pairs a merged clip with another view of its source: data.sampler "
                              f"'{ctx.spec.sampler}' with data.num_clips={ctx.spec.num_clips} does not give 2 views "
                              f"(use same with data.num_clips=2, or cvrl)")
        net = build_student(cfg, ctx.accelerator)
        require_output(net, f"video_{options.space}", cls.name)
        return net, cls(options)

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """View 0 of each clip replaced by its foreground merged onto another clip's view 0."""
        video = batch["video"]  # (B, 2, C, T, H, W)
        if video.ndim != 6 or video.shape[1] != 2 or video.shape[2] != 3:
            raise ConfigError(f"method 'fame' expects 2 RGB views (B, 2, 3, T, H, W), got {tuple(video.shape)}")
        B = video.shape[0]
        if B < 2:
            raise ConfigError("method 'fame' needs at least 2 clips per batch (a background from another video)")
        shift = int(torch.randint(1, B, ()).item())
        donor = (torch.arange(B, device=video.device) + shift) % B  # another clip for every clip
        source = video[:, 0]
        mask = foreground_mask(source, self.o.seed_ratio, self.o.colour_bins)
        merged = merge(source, source[donor], mask)
        return {**batch, "video": torch.stack([merged, video[:, 1]], dim=1), "fame_mask": mask,
                "fame_donor": donor}

    def embed(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {self.key: model({"video": batch["video"]})[self.key]}

    def forward(self, embeddings: dict, batch: dict):
        views = embeddings[self.key].float()  # (B, 2, D), normalised
        loss = nt_xent_loss(views[:, 0], views[:, 1], self.o.temperature)
        terms = {"nt_xent": loss.detach()}
        if "fame_mask" in batch:
            terms["foreground"] = batch["fame_mask"].float().mean()  # the share of pasted pixels, for the log
        return loss, terms
