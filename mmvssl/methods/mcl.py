"""`mcl`: MCL (Li et al., ICCV 2021, "Motion-Focused Contrastive Learning of Video
Representations"), following the official code, YihengZhang-CV/MCL-Motion-Focused-Contrastive-Learning
at commit bdf8141: `MAL` (model/mal.py: the Grad-CAM and the three alignment losses), the gradient
call in train.py's `train_one_epoch`, the ST-motion map of sts/motion_sts.py, the motion-focused
temporal sampling of dataset/video_dataset.py (`motion_focus_temporal_sampling`) and spatial crop of
dataset/augmentations/{clip_transforms.py (`ClipRandomResizedCropMotion`), augmentation_util.py
(`get_cor`)}.

As implemented:
- Views (`data.sampler: same` with 2 clips): two augmentations of one window, contrasted with
  NT-Xent over the global batch (the model: encoder + projection head `video_<space>`).
- Motion-focused temporal sampling, on the device in `prepare` (`keep_share` < 1): the candidate
  sub-clips are the runs of `keep_share` x the decoded frames; with probability `focus_probability`
  (official 0.7) a clip draws uniformly among the int(0.5 R) + 1 runs of most motion (R runs),
  otherwise among all; both views keep the same run.
- Motion-focused spatial crop (`crop_share` < 1): each view's motion, averaged over time and
  block-averaged to 7 x 7, marks its top 10% cells; their bounding box is the motion region, and
  the overlap the crop must reach is 0.9 / 0.8 / 0.7 of it for regions of <= 4 / 8 / 12 cells (no
  constraint beyond). Up to 40 square boxes of `crop_share` x the side are drawn; the first that
  overlaps enough is kept, else the one overlapping most; it is resized back (bilinear).
- ST-motion map (the target): per temporal segment of the clip (one per token time), the motion
  boundaries of the flow summed over the segment's frames (3 x 3 Prewitt-like kernels in x and y,
  edges repeated), their magnitude, block-averaged to the token grid, summed over u and v
  (`st_motion_map`). With `motion: tgrad` (no flow vectors) the map is the |temporal gradient|
  summed over channels, block-averaged the same way.
- Grad-CAM (`grad_cam`): l_pos = q . sg(k) of each view against the other (the unscaled positive
  similarity, not the loss; `positive_similarity`), its gradient with respect to the patch tokens
  entering the encoder's last transformer block (the official: conv3 of the last bottleneck) with
  create_graph (`positive_gradient`); weights = the gradient averaged over each frame's tokens;
  map = ReLU(sum_c weight_c * gradient_c) (the official multiplies the gradient, not the
  activation), per token time, not normalised.
- Alignment (`motion_alignment`, MAL): with P the map and Q the target (N, t, h w):
  spatio-temporal sum_t softmax_t(sum_hw Q) cos(P_t, Q_t), spatial cos(mean_t P, mean_t Q),
  temporal cos(sum_hw P, sum_hw Q); loss = sum of the three (1 - sim).mean().
- loss = NT-Xent + align_weight * alignment (the official weight 1 after its 5 warm-up epochs). The
  saved model is the RGB encoder; MCL has no motion network.

Differences from the official code (docs/methods.md lists them with their reasons): in-batch NT-Xent
instead of MoCo with a memory bank and three keys per clip (same clip, two other clips) and the
order-prediction head (weight 0 on Kinetics); the 2x alignment weight of the first 5 epochs is not
applied; sampling works inside the decoded window, and the crop is a square sub-box of the loader's
random crop rather than the random resized crop itself; Grad-CAM is taken on transformer tokens;
flow is OpenCV's, not TV-L1. Feature-cached accumulation (train.accum_steps > 1) is refused:
Grad-CAM needs the graph from l_pos back to the tokens in one pass. Attention runs on the math
kernel (the fused ones have no double backward), slower on a GPU.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigError
from ..losses.contrastive import nt_xent_loss
from .base import BuildContext, Method, unwrap
from .motion_stream import build_same_window_student, check_motion, motion_input, motion_modalities

MOTION_GRID = 7  # the official motion maps: 7 x 7 blocks (motion_mag_downsample, get_cor)


@dataclass
class MCLOptions:
    motion: str = "tgrad"  # tgrad (consecutive-frame differences) or flow (cached by `shards add-flow`)
    align_weight: float = 1.0
    keep_share: float = 1.0  # temporal focus: runs of this share of the decoded frames (1: all)
    focus_probability: float = 0.7  # official: the motion-focused draw 70% of the time, a uniform one otherwise
    crop_share: float = 1.0  # spatial focus: square boxes of this share of the side (1: no crop)
    temperature: float = 0.1
    space: str = "ssl"


def positive_similarity(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """l_pos (N, 1) = q . sg(k) of normalised embeddings (N, D), not divided by a temperature."""
    return (q * k.detach()).sum(-1, keepdim=True)


def positive_gradient(l_pos: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """d(sum l_pos)/d features, kept in the graph (create_graph) so that a loss on it trains the
    network through it (train.py's autograd.grad call)."""
    return torch.autograd.grad(l_pos, features, grad_outputs=torch.ones_like(l_pos), retain_graph=True,
                               create_graph=True)[0]


def grad_cam(gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MAL.alignment: gradient (N, C, t, h, w) -> (weights (N, C, t, 1, 1), the gradient's mean over
    each frame's positions; map (N, t, h, w) = ReLU(sum_c weights_c * gradient_c))."""
    weight = F.adaptive_avg_pool3d(gradient, (gradient.shape[2], 1, 1))
    return weight, F.relu((weight * gradient).sum(dim=1))


def motion_alignment(cam: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """MAL's three cosine alignments of a map with the motion target, both (N, t, h, w) ->
    sim_spa_temp, sim_spa, sim_tempo (N,), their (1 - sim).mean() losses and loss_mal, their sum."""
    P, Q = cam.flatten(2), target.flatten(2)  # (N, t, hw)
    weight = torch.softmax(Q.sum(-1), dim=1)  # (N, t): the segments' share of the motion
    sims = {"sim_spa_temp": (weight * (F.normalize(P, dim=-1) * F.normalize(Q, dim=-1)).sum(-1)).sum(-1),
            "sim_spa": (F.normalize(P.mean(1), dim=-1) * F.normalize(Q.mean(1), dim=-1)).sum(-1),
            "sim_tempo": (F.normalize(P.sum(-1), dim=-1) * F.normalize(Q.sum(-1), dim=-1)).sum(-1)}
    losses = {"loss" + k[3:]: (1 - v).mean() for k, v in sims.items()}
    return {**sims, **losses, "loss_mal": losses["loss_spa_temp"] + losses["loss_spa"] + losses["loss_tempo"]}


def block_mean(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) -> (..., gh, gw): means of blocks of H // gh x W // gw pixels from the top left,
    the remainder dropped (sts.motion_mag_downsample)."""
    bh, bw = x.shape[-2] // grid[0], x.shape[-1] // grid[1]
    lead = x.shape[:-2]
    pooled = F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), (bh, bw), stride=(bh, bw))[:, 0, :grid[0], :grid[1]]
    return pooled.reshape(*lead, *grid)


def st_motion_map(flow: torch.Tensor, segments: int, grid: tuple[int, int]) -> torch.Tensor:
    """sts/motion_sts.py's ST-motion map: flow (N, 2, T, H, W) -> (N, segments, gh, gw). Per segment
    of T // segments frames and per flow channel, the x and y motion boundaries (3 x 3 kernels
    [-1, 0, 1] across, summed over 3 rows / columns; edges repeated) summed over the segment's
    frames, their magnitude block-averaged, summed over the two channels."""
    N, C, T, H, W = flow.shape
    per = T // segments
    summed = flow[:, :, :per * segments].reshape(N, C, segments, per, H, W).sum(3)  # (N, 2, S, H, W)
    kx = torch.tensor([[-1.0, 0.0, 1.0]] * 3, dtype=flow.dtype, device=flow.device)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): x then y boundaries
    padded = F.pad(summed.reshape(-1, 1, H, W), (1, 1, 1, 1), mode="replicate")
    boundaries = F.conv2d(padded, kernels)  # (N 2 S, 2, H, W)
    magnitude = boundaries.norm(dim=1).reshape(N, C, segments, H, W)
    return block_mean(magnitude, grid).sum(1)


def tgrad_motion_map(tgrad: torch.Tensor, segments: int, grid: tuple[int, int]) -> torch.Tensor:
    """tgrad (N, 3, T, H, W) -> (N, segments, gh, gw): |temporal gradient| summed over channels and
    each segment's frames, block-averaged (the map without flow vectors to take boundaries of)."""
    N, C, T, H, W = tgrad.shape
    per = T // segments
    summed = tgrad[:, :, :per * segments].abs().sum(1).reshape(N, segments, per, H, W).sum(2)
    return block_mean(summed, grid)


def motion_runs(energy: torch.Tensor, keep: int) -> torch.Tensor:
    """energy (B, T) -> (B, R) the motion of each run of `keep` frames (the candidates of the draw)."""
    return energy.unfold(1, keep, 1).sum(-1)


def motion_focused_start(energy: torch.Tensor, keep: int, probability: float, rng: random.Random) -> torch.Tensor:
    """energy (B, T), frame t's motion -> (B,) the start of a run of `keep` frames: with
    `probability` drawn among the int(0.5 R) + 1 runs of most motion (R runs), else among all
    (video_dataset.motion_focus_temporal_sampling with threshold 0.5)."""
    runs = motion_runs(energy, keep)  # (B, R)
    count = min(runs.shape[1], int(runs.shape[1] * 0.5) + 1)
    order = runs.argsort(dim=1, descending=True).tolist()
    return torch.tensor([rng.choice(o[:count] if rng.random() < probability else o) for o in order],
                        device=energy.device)


def motion_region(motion: torch.Tensor, top: float = 0.1, base_ratio: float = 0.8):
    """augmentation_util.get_cor: motion (H, W) -> ((y0, y1), (x0, x1)) the bounding rows / columns
    of its top `top` cells on the 7 x 7 grid, in pixels, and the overlap a crop must reach (0: any)."""
    H, W = motion.shape
    cells = block_mean(motion, (MOTION_GRID, MOTION_GRID)) if min(H, W) >= MOTION_GRID else motion
    g = cells.shape[-1]
    best = cells.flatten().argsort(descending=True)[:max(1, math.floor(cells.numel() * top))]
    rows, cols = (best // g).tolist(), (best % g).tolist()
    area = (max(rows) + 1 - min(rows)) * (max(cols) + 1 - min(cols))
    need = base_ratio + 0.1 if area <= 4 else base_ratio if area <= 8 else base_ratio - 0.1 if area <= 12 else 0.0
    return ((min(rows) * H / cells.shape[-2], (max(rows) + 1) * H / cells.shape[-2]),
            (min(cols) * W / g, (max(cols) + 1) * W / g)), need


def overlap(region: tuple[float, float], span: tuple[float, float]) -> float:
    """The share of `region` (start, end) that `span` covers (augmentation_util.calc_over_lab)."""
    low, high = max(region[0], span[0]), min(region[1], span[1])
    return 0.0 if low >= high else (high - low) / (region[1] - region[0])


def motion_focused_box(motion: torch.Tensor, side: int, rng: random.Random, tries: int = 40) -> tuple[int, int]:
    """motion (H, W) -> (y, x) the top left of a side x side box: drawn at random up to `tries`
    times, the first covering the motion region enough kept, else the one covering most
    (ClipRandomResizedCropMotion.get_params with a fixed square size)."""
    H, W = motion.shape
    (rows, cols), need = motion_region(motion)
    best, best_cover = None, -1.0
    for _ in range(tries if need > 0 else 1):
        y, x = rng.randint(0, H - side), rng.randint(0, W - side)
        cover = overlap(rows, (y, y + side)) * overlap(cols, (x, x + side))
        if need == 0 or cover >= need:
            return y, x
        if cover > best_cover:
            best, best_cover = (y, x), cover
    return best


def crop_resize(x: torch.Tensor, corners: list[tuple[int, int]], side: int, size: int) -> torch.Tensor:
    """x (N, C, T, H, W), corners [(y, x)] * N -> (N, C, T, size, size): each box resized (bilinear)."""
    out = []
    for clip, (y, x0) in zip(x, corners):
        box = clip[..., y:y + side, x0:x0 + side]  # (C, T, side, side)
        out.append(F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False))
    return torch.stack(out)


def motion_magnitude(batch: dict, kind: str) -> torch.Tensor:
    """(B, V, T, H, W) motion of every view and frame: flow length, or |tgrad| summed over channels."""
    if kind == "flow":
        return batch["flow"].float().norm(dim=-4)
    return motion_input(batch, "tgrad").float().abs().sum(dim=-4)


class MCL(Method):
    name = "mcl"
    views_on_device = True  # `mmvssl views` runs prepare: the motion-focused draws are made there
    paper = "MCL (Li et al. 2021): motion-focused sampling and Grad-CAM of l_pos aligned with the ST-motion map"
    Options = MCLOptions

    def __init__(self, student: nn.Module, options: MCLOptions, num_frames: int, seed: int = 0):
        super().__init__()
        check_motion(options.motion, self.name)
        if not 0 < options.keep_share <= 1 or not 0 < options.crop_share <= 1:
            raise ConfigError(f"method 'mcl': method.options.keep_share and crop_share must be in (0, 1], got "
                              f"{options.keep_share}, {options.crop_share}")
        if not 0 <= options.focus_probability <= 1:
            raise ConfigError(f"method 'mcl': method.options.focus_probability must be in [0, 1], got "
                              f"{options.focus_probability}")
        encoder = student.encoders["video"]
        if not hasattr(encoder, "transformer") or not len(encoder.transformer.blocks):
            raise ConfigError(f"method 'mcl' takes Grad-CAM at the last transformer block of the video encoder: "
                              f"model '{student.name}' has none (use a transformer preset, e.g. video-tiny)")
        self.o, self.key, self.num_frames = options, f"video_{options.space}", num_frames
        self.patch = tuple(encoder.patch)
        self.keep = max(1, round(num_frames * options.keep_share))
        if self.keep % self.patch[0]:
            raise ConfigError(f"method 'mcl': keep_share x data.num_frames = {self.keep} frames is not a multiple of "
                              f"the encoder's tubelet length {self.patch[0]}")
        self.modalities = motion_modalities(options.motion)
        self.rng = random.Random(f"mcl/{seed}")  # the motion-focused draws (prepare runs once per batch)
        self.__dict__["captured"] = None  # the hook's activations of the last forward

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        net = build_same_window_student(cls, cfg, ctx, options, "contrasts two augmentations of a window")
        if cfg.train.accum_steps > 1:
            raise ConfigError("method 'mcl': train.accum_steps > 1 is not supported (Grad-CAM needs the graph from "
                              "l_pos to the encoder's tokens in one pass)")
        return net, cls(net, options, ctx.spec.num_frames, ctx.spec.seed)

    @torch.no_grad()
    def prepare(self, batch: dict) -> dict:
        """Motion-focused sampling in time and space; the ST-motion map on the token grid (B, 2, t, h, w)."""
        video = batch["video"]  # (B, 2, C, T, H, W)
        if video.ndim != 6 or video.shape[1] != 2 or video.shape[3] != self.num_frames:
            raise ConfigError(f"method 'mcl' expects 2 views of {self.num_frames} frames, got {tuple(video.shape)}")
        B, V, _, T, H, W = video.shape
        out = dict(batch)
        names = [n for n in ("video", "video_next", "flow") if n in out]
        moving = motion_magnitude(batch, self.o.motion)  # (B, 2, T, H, W)
        if self.keep < T:
            energy = moving[:, 0].mean(dim=(-2, -1))  # (B, T)
            start = motion_focused_start(energy, self.keep, self.o.focus_probability, self.rng)
            out["mcl_run_motion"] = motion_runs(energy, self.keep)  # (B, R): the candidates (`mmvssl views`)
            index = start[:, None] + torch.arange(self.keep, device=video.device)  # (B, keep)
            for name in names:
                x = out[name]
                out[name] = x.gather(3, index[:, None, None, :, None, None].expand(*x.shape[:3], self.keep,
                                                                                 *x.shape[4:]))
            moving = moving.gather(2, index[:, None, :, None, None].expand(B, V, self.keep, H, W))
            out["mcl_start"] = start
        side = max(1, round(min(H, W) * self.o.crop_share))
        if side < min(H, W):
            corners = [motion_focused_box(m, side, self.rng) for m in moving.mean(dim=2).flatten(0, 1).cpu()]
            for name in names:
                x = out[name]
                cropped = crop_resize(x.flatten(0, 1), corners, side, H).view(*x.shape[:4], H, H)
                out[name] = cropped * (H / side) if name == "flow" else cropped  # flow in pixels of the new size
            out["mcl_corners"] = torch.tensor(corners, device=video.device).view(B, V, 2)
        pt, ph, pw = self.patch
        grid, segments = (H // ph, W // pw), self.keep // pt
        if self.o.motion == "flow":
            target = st_motion_map(out["flow"].float().flatten(0, 1), segments, grid)
        else:
            target = tgrad_motion_map(motion_input(out, "tgrad").float().flatten(0, 1), segments, grid)
        out["mcl_motion"] = target.unflatten(0, (B, V))  # (B, 2, t, h, w)
        return out

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The views' embeddings and the patch tokens entering the last transformer block (hooked)."""
        block = unwrap(model).encoders["video"].transformer.blocks[-1]
        captured = []
        handle = block.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            # the math attention kernel: the fused ones (flash, memory-efficient) have no double
            # backward, which the Grad-CAM alignment (a gradient of a gradient) takes
            with sdpa_kernel(SDPBackend.MATH):
                out = model({"video": batch["video"]})
        finally:
            handle.remove()
        self.__dict__["captured"] = captured[-1]  # (B * 2, 1 + N, width), in the graph
        return {self.key: out[self.key]}

    def forward(self, embeddings: dict, batch: dict):
        z = F.normalize(embeddings[self.key].float(), dim=-1)  # (B, 2, D)
        contrast = nt_xent_loss(z[:, 0], z[:, 1], self.o.temperature)
        terms = {"nt_xent": contrast.detach()}
        loss = contrast
        if self.o.align_weight > 0 and torch.is_grad_enabled():
            motion = batch["mcl_motion"].flatten(0, 1).float()  # (B * 2, t, h, w)
            l_pos = positive_similarity(z, z.flip(1)).flatten(0, 1)  # (B * 2, 1): each view against the other
            gradient = positive_gradient(l_pos, self.captured)[:, 1:]  # (B * 2, N, width): aggregation token dropped
            gradient = gradient.float().transpose(1, 2).reshape(*gradient.shape[:1], gradient.shape[2],
                                                                  *motion.shape[1:])  # (B * 2, width, t, h, w)
            _, cam = grad_cam(gradient)  # (B * 2, t, h, w)
            terms["align"] = motion_alignment(cam, motion)["loss_mal"]
            loss = loss + self.o.align_weight * terms["align"]
        return loss, {k: v.detach() for k, v in terms.items()}
