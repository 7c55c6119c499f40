"""The `data:` config section (schema only; read by mmvssl.config), and the builder that turns
it into the loader's keyword arguments (`loader_options`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class AugmentConfig:
    """CVRL's augmentation when switched on; everything off by default (the demo's captions
    name directions, which a flip would contradict)."""
    video: bool = False  # temporally consistent crop / flip / colour / grey / blur
    crop_area: list[float] = field(default_factory=lambda: [0.3, 1.0])  # random resized crop, share of the frame
    crop_aspect: list[float] = field(default_factory=lambda: [0.5, 2.0])
    local_crop_area: list[float] = field(default_factory=lambda: [0.05, 0.4])  # svt's local views (DINO's)
    flip: float = 0.5
    jitter: list[float] = field(default_factory=lambda: [0.8, 0.8, 0.8, 0.2])  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale: float = 0.2
    blur: float = 0.0
    # per view of a sample, replacing blur (CVRL: [1.0, 0.1]); solarisation per view (CVRL: [0.0, 0.2])
    blur_per_view: list[float] = field(default_factory=list)
    solarize_per_view: list[float] = field(default_factory=list)
    crop_overlap: list[float] = field(default_factory=list)  # CSTP: the second view's crop overlaps the first's
    audio: bool = False  # random gain and white noise
    gain_db: list[float] = field(default_factory=lambda: [-6.0, 6.0])
    noise_snr_db: list[float] = field(default_factory=lambda: [20.0, 40.0])
    noise_p: float = 0.5


@dataclass
class DataConfig:
    shards: str = ""  # a folder of .tar shards, a brace pattern, several joined by ','; sets mixed: "a=DIR@0.7;b=DIR@0.3"
    batch_size: int = 16  # per process
    num_workers: int = 2
    num_frames: int = 8
    fps: float = 4.0  # frames per second of the sampled clip: the window is num_frames / fps long
    size: int = 64  # frames are resized (aspect kept, centre/random crop) to size x size
    audio_rate: int = 16000
    context_length: int = 32  # text tokens
    num_candidates: int = 2  # MIL-NCE: the overlapping narration + nearest ones in time
    shuffle_buffer: int = 256
    max_error_rate: float = 0.1  # stop when more than this share of samples fail to decode
    # shard members larger than these (MiB, from the tar header) are refused unread, the sample skipped and counted
    max_member_mb: float = 1024.0  # videos, cached features
    max_text_member_mb: float = 16.0  # .json / .txt / .cls
    seed: int | None = None  # defaults to train.seed
    mode: str = "resampled"  # resampled (endless, seeded per process/worker) or epoch (each sample once)
    epoch_length: int | None = None  # resampled: batches per process per epoch
    sampler: str = "random"  # random, uniform, same, cvrl, overlap, concur, carl, teg, svt (mmvssl.data.sampling;
    # multi-view: video is (B, V, C, T, H, W); `mmvssl views` shows where they lie)
    num_clips: int = 1  # uniform: clips spread over the video; same: views of one window (SimCLR)
    long_scale: float = 2.0  # teg / svt: long (global) window = long_scale x num_frames / fps; overlap: the top rate
    num_global: int = 2  # svt
    num_local: int = 2  # svt
    # cached optical flow in the batch as `flow` (B, [V,] 2, T, H, W): shards from `shards add-flow`
    flow: bool = False
    local_size: int = 0  # svt: local views' size in px (0: data.size); DINO/SVT: 96 beside 224
    local_frames: int = 0  # svt: local views' frame count (0: data.num_frames)
    # LaViLa: each sample's text comes from one of these that it has (human, paraphrase, pseudo),
    # drawn at random; the batch flags generated texts (text_generated)
    text_sources: list[str] = field(default_factory=lambda: ["human"])
    # labels (methods supervised, tg, cmpl): the share of each class's samples that keep their label,
    # those whose key hashes lowest with labelled_seed (mmvssl.data.labels); labelled_share > 0 draws
    # that share of the training stream from the labelled samples (FixMatch's labelled batch; 1: only them)
    labelled_fraction: float = 1.0
    labelled_seed: int = 0
    labelled_share: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def augment_options(cfg):
    """AugmentConfig (or a DictConfig of it) -> mmvssl.data.augment.AugmentOptions."""
    from .augment import AugmentOptions
    for key, low in (("blur_per_view", 0.0), ("solarize_per_view", 0.0), ("crop_overlap", 1e-9)):
        if any(not low <= float(p) <= 1.0 for p in getattr(cfg, key)):
            raise ConfigError(f"data.augment.{key}: every entry must lie in {'(0' if low else '[0'}, 1], "
                              f"got {list(getattr(cfg, key))}")
    return AugmentOptions(video=bool(cfg.video), crop_scale=tuple(cfg.crop_area), crop_ratio=tuple(cfg.crop_aspect),
                          local_crop_scale=tuple(cfg.local_crop_area),
                          flip=float(cfg.flip), jitter=tuple(cfg.jitter), jitter_p=float(cfg.jitter_p),
                          grayscale=float(cfg.grayscale), blur=float(cfg.blur),
                          blur_per_view=tuple(cfg.blur_per_view), solarize_per_view=tuple(cfg.solarize_per_view),
                          crop_overlap=tuple(cfg.crop_overlap), audio=bool(cfg.audio),
                          gain_db=tuple(cfg.gain_db), noise_snr_db=tuple(cfg.noise_snr_db), noise_p=float(cfg.noise_p))


def sample_spec(data, train: bool, seed: int):
    """The `data:` section -> SampleSpec (every sampling and augmentation field)."""
    from .loader import SampleSpec
    from .sampling import TEXT_SOURCES
    sources = tuple(data.text_sources)
    unknown = [s for s in sources if s not in TEXT_SOURCES]
    if unknown or not sources:
        raise ConfigError(f"data.text_sources: unknown or no source {unknown} (choose from {', '.join(TEXT_SOURCES)})")
    return SampleSpec(num_frames=data.num_frames, fps=data.fps, size=data.size, audio_rate=data.audio_rate,
                      context_length=data.context_length, num_candidates=data.num_candidates, train=train,
                      seed=seed, sampler=data.sampler if train else "random", num_clips=data.num_clips,
                      long_scale=data.long_scale, num_global=data.num_global, num_local=data.num_local,
                      local_size=data.local_size, local_frames=data.local_frames,
                      text_sources=sources if train else ("human",),
                      labelled_share=float(data.labelled_share) if train else 0.0,
                      augment=augment_options(data.augment) if train else augment_options(AugmentConfig()),
                      flow=bool(data.flow))


def loader_options(data) -> dict:
    """Keyword arguments of build_loader beyond the SampleSpec."""
    return {"num_workers": data.num_workers, "shuffle_buffer": data.shuffle_buffer,
            "max_error_rate": data.max_error_rate, "mode": data.mode, "epoch_length": data.epoch_length,
            "member_limits": member_limits(data)}


def member_limits(data):
    """data.max_member_mb / max_text_member_mb -> shardio.MemberLimits (checked > 0)."""
    from .shardio import MemberLimits
    for key in ("max_member_mb", "max_text_member_mb"):
        if not float(getattr(data, key)) > 0:
            raise ConfigError(f"data.{key} must be > 0 (MiB), got {getattr(data, key)}")
    return MemberLimits(float(data.max_member_mb), float(data.max_text_member_mb))
