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
    # per view of a sample (the loader's order; views past the list take its last entry), replacing `blur`:
    # CVRL's (1.0, 0.1); and the probability of solarising (pixels >= 128 inverted), CVRL's (0.0, 0.2)
    # (tensorflow/models official/projects/video_ssl/dataloaders/video_ssl_input.py `_process_image`)
    blur_per_view: tuple[float, ...] = ()
    solarize_per_view: tuple[float, ...] = ()
    # CSTP: each odd view is cropped the size of the view before it, overlapping it by one of these shares
    # of its area, drawn uniformly (KT27-A/CSTP preprocess_data.py ClipRandomSizedCropOverlap); () off
    crop_overlap: tuple[float, ...] = ()
    audio: bool = False
    gain_db: tuple[float, float] = (-6.0, 6.0)
    noise_snr_db: tuple[float, float] = (20.0, 40.0)  # white noise at this signal-to-noise ratio
    noise_p: float = 0.5

    @property
    def decode_short_side(self) -> float:
        """Decode a little larger than the output so that crops keep detail."""
        return 1.15


def per_view(values: tuple[float, ...], view: int, default: float) -> float:
    """values[view] (the last entry past the end), or `default` when there are none."""
    return float(values[min(view, len(values) - 1)]) if values else default


def build_video_transform(options: AugmentOptions, size: int, view: int = 0):
    """The transforms of view `view` of a sample (they differ only where blur_per_view /
    solarize_per_view say); solarisation last, after the blur, as CVRL's `_process_image`."""
    from torchvision.transforms import v2

    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    solarize = per_view(options.solarize_per_view, view, 0.0)
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=options.crop_scale, ratio=options.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(options.flip),
        v2.RandomApply([v2.ColorJitter(*options.jitter)], p=options.jitter_p),
        v2.RandomApply([video_grayscale()], p=options.grayscale),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=per_view(options.blur_per_view, view,
                                                                                options.blur)),
        *([v2.RandomSolarize(threshold=128, p=solarize)] if solarize > 0 else []),  # uint8: x / 255 >= 0.5
    ])


def overlapping_crop(first: dict, H: int, W: int, shares: tuple[float, ...], rng: random.Random) -> dict:
    """CSTP's second crop (KT27-A/CSTP data_process/preprocess_data.py ClipRandomSizedCropOverlap, flag 1):
    the first crop's size, moved towards one of its corners so that the two share an s_w x s_h region
    with s_w uniform in [share x w, w] and s_h = share x w x h / s_w (share drawn uniformly from
    `shares`): drawn again until it lies in the H x W frame. Written here because no library draws
    a crop against another; pixel boxes as RandomResizedCrop's params ({top, left, height, width})."""
    top, left, h, w = first["top"], first["left"], first["height"], first["width"]
    for _ in range(100):  # a share of 1 (the same box) always fits
        share = rng.choice(shares)
        overlap_w = rng.randint(max(1, int(share * w)), w)
        overlap_h = int(share * w * h / overlap_w)
        x = left + rng.choice((-1, 1)) * (w - overlap_w)
        y = top + rng.choice((-1, 1)) * (h - overlap_h)
        if 0 <= x <= W - w and 0 <= y <= H - h:
            return {"top": y, "left": x, "height": h, "width": w}
    return dict(first)


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
        views = max(len(options.blur_per_view), len(options.solarize_per_view), 1)
        self.view_transforms = [build_video_transform(options, size, v) for v in range(views)] if options.video else []
        self.video_transform = self.view_transforms[0] if options.video else None  # the first view's
        self._sample, self._view, self._previous = None, 0, None  # the sample's generator, view index, last crop

    def view_index(self, rng: random.Random) -> int:
        """Which view of its sample this call augments: the loader augments a sample's views in order with
        the sample's own generator, so a call with the previous call's generator is that sample's next view."""
        self._view = self._view + 1 if rng is self._sample else 0
        self._sample = rng
        return self._view

    def video(self, frames: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8, one parameter draw for all T frames."""
        return self.video_and_crop(frames, rng)[0]

    def video_and_crop(self, frames: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, list[float]]:
        """`video`, and the crop it took: [x0, y0, x1, y1], a share of the input frame's width and
        height ([0, 0, 1, 1] without augmentation)."""
        return self.video_crop_flip(frames, rng)[:2]

    def video_crop_flip(self, frames: torch.Tensor, rng: random.Random,
                        view: int | None = None) -> tuple[torch.Tensor, list[float], bool]:
        """`video_and_crop`, and whether the clip was flipped horizontally (what cached optical flow
        needs to follow the pixels). The transforms of build_video_transform run one by one with their
        own draws in Compose's order, so the frames are exactly `view_transforms[view]`'s. `view`: the
        view's index in its sample (default: view_index(rng)); with crop_overlap, an odd view's crop
        overlaps the previous view's (overlapping_crop) instead of being drawn on its own."""
        view = self.view_index(rng) if view is None else view
        if self.video_transform is None:
            return frames, [0.0, 0.0, 1.0, 1.0], False
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        clip = tv_tensors.Video(frames.permute(0, 3, 1, 2))  # (T, C, H, W)
        H, W = clip.shape[-2:]
        crop, flip, *rest = self.view_transforms[min(view, len(self.view_transforms) - 1)].transforms
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(62))
            previous = self._previous
            if self.options.crop_overlap and view % 2 and previous is not None and previous[1:] == (H, W):
                params = overlapping_crop(previous[0], H, W, self.options.crop_overlap, rng)
            else:
                params = crop.make_params([clip])  # what RandomResizedCrop.forward draws
            self._previous = (params, H, W)
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
