"""Augmentation: temporally consistent spatial transforms for video (one set of random
parameters for every frame of a clip, CVRL), audio gain and noise. Off unless configured.

torchvision.transforms.v2 applies one draw of parameters to a whole `tv_tensors.Video`
(T, C, H, W), which is exactly CVRL's temporal consistency; we only seed it per sample so
that a resumed stream augments the same way as an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class AugmentOptions:
    """CVRL's recipe when enabled; every field configurable (DataConfig.augment_*)."""
    video: bool = False
    crop_scale: tuple[float, float] = (0.3, 1.0)  # area of the random resized crop
    crop_ratio: tuple[float, float] = (0.5, 2.0)  # aspect ratio of the crop
    local_crop_scale: tuple[float, float] = (0.05, 0.4)  # SVT / DINO local views' crop area
    flip: float = 0.5  # horizontal flip probability (0 where captions name directions)
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale: float = 0.2
    blur: float = 0.0  # probability of a Gaussian blur (kernel ~10% of the size)
    audio: bool = False
    gain_db: tuple[float, float] = (-6.0, 6.0)
    noise_snr_db: tuple[float, float] = (20.0, 40.0)  # white noise at this signal-to-noise ratio
    noise_p: float = 0.5

    @property
    def decode_short_side(self) -> float:
        """Decode a little larger than the output so that crops keep detail."""
        return 1.15


def build_video_transform(options: AugmentOptions, size: int):
    from torchvision.transforms import v2

    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=options.crop_scale, ratio=options.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(options.flip),
        v2.RandomApply([v2.ColorJitter(*options.jitter)], p=options.jitter_p),
        v2.RandomApply([video_grayscale()], p=options.grayscale),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=options.blur),
    ])


def video_grayscale():
    """Grayscale for every frame. torchvision 0.26's v2.Grayscale passes tv_tensors.Video
    through unchanged, so we call the functional kernel on the plain (T, C, H, W) tensor."""
    from torchvision.transforms import v2

    def to_gray(video):
        from torchvision import tv_tensors
        return tv_tensors.wrap(v2.functional.rgb_to_grayscale(video.as_subclass(torch.Tensor), 3), like=video)
    return v2.Lambda(to_gray)


class Augmenter:
    """Callable on one clip: frames (T, H, W, 3) uint8 -> (T, size, size, 3) uint8; audio (S,)."""

    def __init__(self, options: AugmentOptions, size: int):
        self.options, self.size = options, size
        self.video_transform = build_video_transform(options, size) if options.video else None

    def video(self, frames: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8, one parameter draw for all T frames."""
        return self.video_and_crop(frames, rng)[0]

    def video_and_crop(self, frames: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, list[float]]:
        """`video`, and the crop it took: [x0, y0, x1, y1], a share of the input frame's width and
        height ([0, 0, 1, 1] without augmentation)."""
        return self.video_crop_flip(frames, rng)[:2]

    def video_crop_flip(self, frames: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, list[float], bool]:
        """`video_and_crop`, and whether the clip was flipped horizontally (what cached optical flow
        needs to follow the pixels). The transforms of build_video_transform run one by one with their
        own draws in Compose's order, so the frames are exactly `video_transform`'s."""
        if self.video_transform is None:
            return frames, [0.0, 0.0, 1.0, 1.0], False
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        clip = tv_tensors.Video(frames.permute(0, 3, 1, 2))  # (T, C, H, W)
        H, W = clip.shape[-2:]
        crop, flip, *rest = self.video_transform.transforms
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(62))
            params = crop.make_params([clip])  # what RandomResizedCrop.forward draws
            out = crop.transform(clip, params)
            flipped = bool(torch.rand(1) < flip.p)  # RandomHorizontalFlip.forward's one draw
            if flipped:
                out = v2.functional.horizontal_flip(out)
            for transform in rest:
                out = transform(out)
        box = [params["left"] / W, params["top"] / H, (params["left"] + params["width"]) / W,
               (params["top"] + params["height"]) / H]
        return out.permute(0, 2, 3, 1).contiguous(), box, flipped

    def audio(self, wave: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """(S,) float: random gain, then white noise at a random SNR (probability noise_p)."""
        if not self.options.audio:
            return wave
        o = self.options
        wave = wave * 10 ** (rng.uniform(*o.gain_db) / 20.0)
        if rng.random() < o.noise_p and wave.numel():
            power = wave.pow(2).mean().clamp_min(1e-8)
            noise_power = power / 10 ** (rng.uniform(*o.noise_snr_db) / 10.0)
            g = torch.Generator().manual_seed(rng.getrandbits(62))
            wave = wave + torch.randn(wave.shape, generator=g) * noise_power.sqrt()
        return wave.clamp(-1.0, 1.0)
