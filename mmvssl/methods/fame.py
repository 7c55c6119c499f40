"""`fame`: FAME (Ding et al. 2022, "Motion-aware Contrastive Video Representation Learning via
Foreground-background Merging", CVPR): the moving foreground of a clip is pasted onto another
video's background, and the merged clip and another clip of the source are positives, so the
representation cannot lean on the static background.

Follows the official code, https://github.com/Mark12Ding/FAME at commit
0600c0e9e08c00f9e92f18ec604c5720fad57156: `moco/loader.py` (class `FAME`: `getmask`, `getSeg`,
`norm_batch`, `forward`) and its use in `train.py` (`video[0] = aug_gpu(FA(video[0]))`,
`video[1] = aug_gpu(video[1])`). `fame_steps` reproduces the official numbers of
tests/data/parity/fame (tests/parity/fame.py):

1. motion: the mean over t of sum_c |x_t - x_{t+1}| (B, H, W), on clips in [0, 1];
2. Gaussian blur (kernel int(0.1 * crop) // 2 * 2 + 1, sigma kernel / 3, reflect border), then a
   per-clip min-max normalisation (`norm_batch`);
3. colour of each pixel: HSV of the clip's mean frame, hue in radians as kornia gives it, and the
   official (s cos(2 pi h) + 1) / 2, (s sin(2 pi h) + 1) / 2 with h still in radians (a unit slip
   upstream, kept: it is what the official numbers are), each of the two and v binned to 10 levels
   with round-half-to-even: colour index 1..999;
4. histograms of the 50 % most moving pixels (foreground) and the 10 % least moving (background,
   +1 on every bin); refine = P_fg / (P_fg + P_bg) per pixel, blurred and normalised again;
5. the mask: exactly int(beta * H * W) pixels with the highest score, static over time;
6. merge: fused_i = x_perm[i] (1 - mask_i) + x_i mask_i with perm = torch.randperm(B) (a clip may
   draw itself and stay whole, as upstream).

The views (configs/methods/fame.yaml): two clips of one video (sampler `cvrl`; upstream draws two
different clips uniformly), each cropped and flipped by the loader; `prepare` merges the query
(view 0) on the device, then applies the colour augmentation of upstream's `Augment_GPU_pre` to
both views (grayscale 0.2, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, Gaussian blur p 0.5), so FAME
sees the clips before colour augmentation as upstream does.

Departures (docs/methods.md lists them with their reasons): in-batch NT-Xent instead of MoCo's key
encoder and queue; the two clips' gap follows CVRL's density instead of two uniform draws; the
blur's sigma is drawn per clip (upstream draws it once per run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ..data.loader import VIDEO_MEAN, VIDEO_STD
from ..errors import ConfigError
from ..losses.contrastive import nt_xent_loss
from .base import BuildContext, Method, require_output
from .contrastive import build_student

HSV_BINS = 10  # per axis of the (hue x, hue y, value) colour cube: 1000 histogram bins, bin 0 unused
FOREGROUND_SAMPLE, BACKGROUND_SAMPLE = 0.5, 0.1  # shares of the pixels whose colours make the histograms
EPS = 1e-8


@dataclass
class FAMEOptions:
    beta: float = 0.5  # share of the pixels in the foreground mask (exactly int(beta * H * W))
    temperature: float = 0.1
    colour_augment: bool = True  # upstream's GPU colour augmentation of both views, after the merge
    space: str = "ssl"


def blur_kernel_size(crop_size: int) -> int:
    """The official kernel: int(0.1 * crop_size) // 2 * 2 + 1 (112 -> 11, 224 -> 23); sigma is size / 3."""
    return int(0.1 * crop_size) // 2 * 2 + 1


def gaussian_blur(maps: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, H, W) -> (B, H, W): kornia's GaussianBlur2d((k, k), (k / 3, k / 3)) with its reflect
    border. torchvision's gaussian_blur has the same kernel (exp(-x^2 / 2 sigma^2), normalised)
    and border; kornia, upstream's library, is not a dependency of mmvssl."""
    from torchvision.transforms.v2.functional import gaussian_blur as tv_gaussian_blur
    sigma = kernel_size / 3
    return tv_gaussian_blur(maps[:, None], [kernel_size, kernel_size], [sigma, sigma])[:, 0]


def min_max_normalise(maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Upstream's norm_batch, per map (B, H, W): subtract the minimum, divide by the maximum after
    the subtraction + eps."""
    flat = maps.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    return (flat / (flat.max(dim=1, keepdim=True).values + eps)).view_as(maps)


def rgb_to_hsv(rgb: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> (..., 3, H, W) HSV as kornia.color.rgb_to_hsv gives it: hue in
    radians [0, 2 pi) from the sextant of the first maximal channel (r, g, b), s = (max - min) /
    (max + eps), v = max. Written here because kornia is not a dependency and torchvision has no
    public HSV conversion (its private one gives the hue in [0, 1) and differs at grey pixels)."""
    v, argmax = rgb.max(dim=-3)
    delta = v - rgb.min(dim=-3).values
    s = delta / (v + eps)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    r, g, b = (v.unsqueeze(-3) - rgb).unbind(dim=-3)  # distance of each channel below the maximum
    sextants = torch.stack([b - g, (r - b) + 2.0 * safe, (g - r) + 4.0 * safe], dim=-3) / safe.unsqueeze(-3)
    h = sextants.gather(-3, argmax.unsqueeze(-3)).squeeze(-3)
    h = 2.0 * math.pi * ((h / 6.0) % 1.0)
    return torch.stack([h, s, v], dim=-3)


def colour_coordinates(hsv: torch.Tensor, bins: int = HSV_BINS) -> torch.Tensor:
    """(B, 3, H, W) HSV -> (B, 3, H, W): (bins - 1) x + 1 for x = (s cos(2 pi h) + 1) / 2,
    (s sin(2 pi h) + 1) / 2 and v, before rounding. The hue h is in radians and still multiplied by
    2 pi: upstream's unit slip, kept because it is what the official code computes."""
    h, s, v = hsv.unbind(dim=1)
    hx = (s * torch.cos(h * 2 * math.pi) + 1) / 2
    hy = (s * torch.sin(h * 2 * math.pi) + 1) / 2
    return torch.stack([hx, hy, v], dim=1) * (bins - 1) + 1


def colour_index(coords: torch.Tensor, bins: int = HSV_BINS) -> torch.Tensor:
    """(B, 3, H, W) colour coordinates -> (B, H, W) long in 1..bins^3 - 1 (round half to even)."""
    q = coords.round()
    return (q[:, 0] + (q[:, 1] - 1) * bins + (q[:, 2] - 1) * bins * bins).long()


def colour_histograms(index: torch.Tensor, motion: torch.Tensor, bins: int = HSV_BINS
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour index and motion (B, H, W) -> (P(colour | fg), P(colour | bg)), each (B, bins^3): the
    colours of the int(0.5 HW) most moving pixels, and of the int(0.1 HW) least moving ones with +1
    on every bin (upstream's fixed samples, whatever beta)."""
    B, H, W = index.shape
    flat, score = index.flatten(1), motion.flatten(1)
    fg = flat.gather(1, score.topk(int(FOREGROUND_SAMPLE * H * W), dim=1).indices)
    bg = flat.gather(1, score.topk(int(BACKGROUND_SAMPLE * H * W), dim=1, largest=False).indices)
    counts = [torch.zeros(B, bins ** 3, device=index.device).scatter_add_(1, x, torch.ones_like(x, dtype=torch.float))
              for x in (fg, bg)]
    fg_counts, bg_counts = counts[0], counts[1] + 1
    return (fg_counts / (fg_counts.sum(dim=1, keepdim=True) + EPS),
            bg_counts / (bg_counts.sum(dim=1, keepdim=True) + EPS))


def top_area_mask(score: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, H, W) -> (B, H, W) float: 1 on exactly int(beta * H * W) pixels of highest score, 0 elsewhere."""
    B, H, W = score.shape
    top = score.flatten(1).topk(int(beta * H * W), dim=1).indices
    return torch.zeros(B, H * W, device=score.device).scatter_(1, top, 1.0).view(B, H, W)


@torch.no_grad()
def fame_steps(video: torch.Tensor, beta: float = 0.5) -> dict[str, torch.Tensor]:
    """Every step of FAME's foreground mask on clips (B, 3, T, H, W) in [0, 1] (H = W = the crop
    size): im_diff, motion_mask, hsv, colour_coords, colour_index, refine_mask, seg_score and mask
    (B, H, W), the tensors of the official run (tests/data/parity/README-motion.md)."""
    B, C, T, H, W = video.shape
    if C != 3 or T < 2:
        raise ValueError(f"FAME expects RGB clips of at least 2 frames (B, 3, T, H, W), got {tuple(video.shape)}")
    video = video.float()
    k = blur_kernel_size(H)
    im_diff = (video[:, :, :-1] - video[:, :, 1:]).abs().sum(dim=1).mean(dim=1)  # (B, H, W)
    motion = min_max_normalise(gaussian_blur(im_diff, k))
    hsv = rgb_to_hsv(video.mean(dim=2))  # (B, 3, H, W) of the mean frame
    coords = colour_coordinates(hsv)
    index = colour_index(coords)
    p_fg, p_bg = colour_histograms(index, motion)
    pr_fg, pr_bg = p_fg.gather(1, index.flatten(1)), p_bg.gather(1, index.flatten(1))
    refine = (pr_fg / (pr_bg + pr_fg)).view(B, H, W)
    seg = min_max_normalise(gaussian_blur(refine, k))
    return {"im_diff": im_diff, "motion_mask": motion, "hsv": hsv, "colour_coords": coords, "colour_index": index,
            "refine_mask": refine, "seg_score": seg, "mask": top_area_mask(seg, beta)}


def foreground_mask(video: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """FAME's static foreground mask (B, H, W) of clips (B, 3, T, H, W) in [0, 1]."""
    return fame_steps(video, beta)["mask"]


def merge(video: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Clips (B, C, T, H, W), masks (B, H, W), perm (B,) -> fused_i = x_perm[i] (1 - mask_i) +
    x_i mask_i: clip i's foreground on every frame of clip perm[i]."""
    m = mask[:, None, None].to(video.dtype)  # (B, 1, 1, H, W)
    return video[perm] * (1 - m) + video * m


def colour_augment(video: torch.Tensor) -> torch.Tensor:
    """Upstream's Augment_GPU_pre on clips (B, 3, T, H, W) in [0, 1], one draw per clip for all its
    frames: grayscale (p 0.2), colour jitter (0.4, 0.4, 0.4, 0.1; p 0.8), Gaussian blur (kernel as
    the mask's, sigma in [0.1, 2]; p 0.5). torchvision's v2 transforms draw once per call, hence
    the loop over clips; they use the torch RNG, which the engine checkpoints."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from ..data.augment import video_grayscale
    k = blur_kernel_size(video.shape[-1])
    transform = v2.Compose([v2.RandomApply([video_grayscale()], p=0.2),
                            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                            v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5)])
    clips = [transform(tv_tensors.Video(clip.transpose(0, 1))).as_subclass(torch.Tensor).transpose(0, 1)
             for clip in video]  # each (T, C, H, W) through the transforms
    return torch.stack(clips).clamp(0, 1)


class FAME(Method):
    name = "fame"
    paper = "FAME (Ding et al. 2022): static foreground (blurred motion + HSV histograms) merged onto another clip"
    Options = FAMEOptions

    def __init__(self, options: FAMEOptions):
        super().__init__()
        if not 0 < options.beta < 1:
            raise ConfigError(f"method 'fame': method.options.beta must be in (0, 1), got {options.beta}")
        self.o, self.key = options, f"video_{options.space}"
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        if ctx.spec.sampler != "cvrl":
            raise ConfigError(f"method 'fame' pairs two clips of one video (the merged query and its key): "
                              f"data.sampler '{ctx.spec.sampler}' does not give them (use cvrl)")
        net = build_student(cfg, ctx.accelerator)
        require_output(net, f"video_{options.space}", cls.name)
        return net, cls(options)

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """View 0 (the query) merged with another clip's background; then, with `colour_augment`,
        upstream's colour augmentation of both views."""
        video = batch["video"]  # (B, 2, C, T, H, W), normalised
        if video.ndim != 6 or video.shape[1] != 2 or video.shape[2] != 3:
            raise ConfigError(f"method 'fame' expects 2 RGB views (B, 2, 3, T, H, W), got {tuple(video.shape)}")
        mean, std = VIDEO_MEAN.to(video.device), VIDEO_STD.to(video.device)
        views = (video.float() * std + mean).clamp(0, 1)  # (B, 2, 3, T, H, W) in [0, 1], as upstream's input
        query = views[:, 0]
        mask = foreground_mask(query, self.o.beta)  # (B, H, W)
        perm = torch.randperm(video.shape[0], device=video.device)
        views = torch.stack([merge(query, mask, perm), views[:, 1]], dim=1)
        if self.o.colour_augment:
            views = torch.stack([colour_augment(views[:, 0]), colour_augment(views[:, 1])], dim=1)
        return {**batch, "video": ((views - mean) / std).to(video.dtype), "fame_mask": mask, "fame_perm": perm}

    def embed(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {self.key: model({"video": batch["video"]})[self.key]}

    def forward(self, embeddings: dict, batch: dict):
        views = embeddings[self.key].float()  # (B, 2, D), normalised
        loss = nt_xent_loss(views[:, 0], views[:, 1], self.o.temperature)
        terms = {"nt_xent": loss.detach()}
        if "fame_perm" in batch:  # the share of clips merged onto another clip (randperm may keep one in place)
            perm = batch["fame_perm"]
            terms["merged"] = (perm != torch.arange(len(perm), device=perm.device)).float().mean()
        return loss, terms
