"""`stcmix`: STC-Mix and Cross-Modal Manifold Cutmix (Das and Ryoo, "Cross-modal Manifold Cutmix
for Self-supervised Video Representation Learning", MVA 2023): cutmix of videos in space and time,
at the input within a stream and at a hidden layer across streams, trained with soft-target
contrastive losses.

As implemented:
- Views (`data.sampler: same` with 2 clips): two augmentations of one window. The RGB stream is the
  model; the motion stream is a network of the same architecture on the motion input (`motion:
  tgrad`, frame differences of the view, or `flow`, its cached optical flow;
  mmvssl/methods/motion_stream.py), owned by the method. Every clip i gets a donor clip
  j = (i + s) mod B (s drawn from 1..B-1 per step) and one mixing share per step, lam ~ Beta(alpha,
  alpha).
- STC-Mix (input level, in each stream): a cuboid of view 0 of clip j (each side (1 - lam)^(1/3) of
  the clip's, at a random place, the same for the batch) replaces that cuboid of view 0 of clip i;
  lam becomes the share of the clip kept. The mixed clip is contrasted with the view-1 embeddings of
  its stream over the global batch, with the soft target lam on clip i and 1 - lam on clip j.
- Cross-modal manifold cutmix (CMMC): at the input of transformer block `mix_layer` of the host
  stream, a cuboid of the token grid (t x h x w, the aggregation token untouched) is replaced by the
  other stream's tokens of clip j at the same layer (captured in the same step, in the graph); the
  rest of the host network runs on the mixed tokens. The result is contrasted with the *other*
  stream's view-1 embeddings: soft target lam on i, 1 - lam on j. Both directions (RGB hosting
  motion, motion hosting RGB).
- Cross-modal InfoNCE between the streams (RGB view 0, motion view 1), the plain contrast the
  mixing terms build on.
- loss = cross_weight * cross + stc_weight * (stc_rgb + stc_motion) / 2
  + cmmc_weight * (cmmc_rgb + cmmc_motion) / 2. The saved model is the RGB stream.

Reference: no official code found public after looking (the code index searched by the paper's title
and "cross-modal manifold cutmix"; the first author's 15 indexed repositories, srijandas07/*, hold
none; a curated list of video SSL papers gives the MVA paper with no code link), so the paper's text
is the reference.

Departures from the paper: the paper trains in two stages (STC-Mix per modality, then CMMC between
modalities initialised from them) with MoCo-style memory and 3-D CNNs mixing feature maps of a
chosen residual stage; here the terms train together from the start, negatives are the global
batch, and the hidden layer is a transformer block's input (the token grid). One cuboid and one lam
per step for the whole batch (as CutMix draws them). Each stream runs several forwards per step
(views, input mix, hidden mix); feature-cached accumulation is refused (each micro-batch would draw
its own donors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.contrastive import nce_loss
from ..losses.gather import gather_with_grad, world
from .base import BuildContext, Method, unwrap
from .motion_stream import (MotionPathway, build_motion_network, build_same_window_student, check_motion, motion_input,
                            motion_modalities)


@dataclass
class STCMixOptions:
    motion: str = "tgrad"  # tgrad (frame differences, on the device) or flow (cached by `shards add-flow`)
    alpha: float = 1.0  # lam ~ Beta(alpha, alpha): the share of the host kept
    mix_layer: int = 1  # CMMC mixes the tokens entering this transformer block (0: the embedded patches)
    cross_weight: float = 1.0
    stc_weight: float = 1.0
    cmmc_weight: float = 1.0
    temperature: float = 0.1
    space: str = "ssl"


def cuboid(grid: tuple[int, ...], lam: float, generator: torch.Generator | None = None) -> tuple[slice, ...]:
    """A cuboid of a grid (T, H, W): each side round((1 - lam)^(1/3) x the grid's), at least 1, at a
    random place."""
    share = (1.0 - lam) ** (1.0 / 3.0)
    out = []
    for n in grid:
        size = min(n, max(1, round(n * share)))
        start = int(torch.randint(0, n - size + 1, (1,), generator=generator).item())
        out.append(slice(start, start + size))
    return tuple(out)


def kept_share(grid: tuple[int, ...], box: tuple[slice, ...]) -> float:
    """The share of the grid outside the cuboid: the host's lam."""
    inside = 1
    for s in box:
        inside *= s.stop - s.start
    total = 1
    for n in grid:
        total *= n
    return 1.0 - inside / total


def stc_mix(x: torch.Tensor, donor: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
    """x (B, C, T, H, W): the cuboid `box` (over T, H, W) of every clip replaced by its donor's."""
    out = x.clone()
    out[(slice(None), slice(None), *box)] = x[donor][(slice(None), slice(None), *box)]
    return out


def soft_contrast(query: torch.Tensor, keys: torch.Tensor, donor: torch.Tensor, lam: float,
                  temperature: float) -> torch.Tensor:
    """query (B, D) mixed embeddings, keys (B, D) embeddings of the unmixed clips, donor (B,) local
    indices: cross-entropy of softmax(query . keys_all / tau) against the soft target lam on the
    clip itself and 1 - lam on its donor, over the global batch's keys."""
    B = query.shape[0]
    rank, _ = world()
    logits = query @ gather_with_grad(keys).T / temperature  # (B, world * B)
    own = torch.arange(B, device=query.device) + rank * B
    target = torch.zeros_like(logits)
    target[torch.arange(B), own] = lam
    target[torch.arange(B), donor + rank * B] += 1.0 - lam
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def token_grid(encoder: nn.Module, clip_shape: torch.Size) -> tuple[int, int, int]:
    """(t, h, w) tokens of a transformer video encoder for clips (..., C, T, H, W)."""
    T, H, W = clip_shape[-3:]
    pt, ph, pw = encoder.patch
    return T // pt, H // ph, W // pw


class STCMix(Method):
    name = "stcmix"
    paper = "STC-Mix and cross-modal manifold cutmix (Das and Ryoo 2023): soft-target contrast of mixed clips"
    Options = STCMixOptions

    def __init__(self, student: nn.Module, motion_network: nn.Module, options: STCMixOptions):
        super().__init__()
        check_motion(options.motion, self.name)
        if max(options.cross_weight, options.stc_weight, options.cmmc_weight) <= 0 or options.alpha <= 0:
            raise ConfigError("method 'stcmix': a loss weight and alpha must be positive")
        for net in (student, motion_network):
            encoder = net.encoders["video"]
            if not hasattr(encoder, "transformer") or not 0 <= options.mix_layer < len(encoder.transformer.blocks):
                raise ConfigError(f"method 'stcmix' mixes the tokens entering transformer block "
                                  f"method.options.mix_layer={options.mix_layer}: model '{net.name}' has "
                                  f"{len(getattr(getattr(encoder, 'transformer', None), 'blocks', []))} blocks "
                                  f"(use a transformer preset, e.g. video-tiny)")
        self.o, self.key = options, f"video_{options.space}"
        self.motion = MotionPathway(motion_network, options.motion, self.key)
        self.modalities = motion_modalities(options.motion)
        self.__dict__["mix"] = None  # (donor (B,), lam, token lam) drawn by the last embed

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        net = build_same_window_student(cls, cfg, ctx, options, "contrasts mixed clips with a second augmentation")
        if cfg.train.accum_steps > 1:
            raise ConfigError("method 'stcmix': train.accum_steps > 1 is not supported (each micro-batch would "
                              "draw its own donors and cuboid)")
        return net, cls(net, build_motion_network(cfg, options.motion, cls.name), options)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.motion.network]

    def _run(self, net: nn.Module, clips: torch.Tensor, capture: list | None = None,
             replace=None) -> torch.Tensor:
        """net's embeddings of clips; the tokens entering block mix_layer are appended to `capture`,
        or changed by `replace(tokens) -> tokens` on their way in."""
        block = unwrap(net).encoders["video"].transformer.blocks[self.o.mix_layer]

        def hook(module, args):
            if capture is not None:
                capture.append(args[0])
            if replace is not None:
                return (replace(args[0]), *args[1:])
            return None
        handle = block.register_forward_pre_hook(hook)
        try:
            return net({"video": clips})[self.key]
        finally:
            handle.remove()

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        video = batch["video"]  # (B, 2, C, T, H, W)
        if video.ndim != 6 or video.shape[1] != 2:
            raise ConfigError(f"method 'stcmix' expects 2 views per clip, got {tuple(video.shape)}")
        B = video.shape[0]
        if B < 2:
            raise ConfigError("method 'stcmix' needs at least 2 clips per batch (a donor for every clip)")
        motion = motion_input(batch, self.o.motion)  # (B, 2, C_m, T, H, W)
        donor = (torch.arange(B, device=video.device) + int(torch.randint(1, B, ()).item())) % B
        lam_drawn = float(torch.distributions.Beta(self.o.alpha, self.o.alpha).sample())
        box = cuboid(tuple(video.shape[-3:]), lam_drawn)  # input level, over (T, H, W)
        lam = kept_share(tuple(video.shape[-3:]), box)
        grid = token_grid(unwrap(model).encoders["video"], video.shape)
        token_box = cuboid(grid, lam_drawn)
        token_lam = kept_share(grid, token_box)
        self.motion.network.train(model.training)
        hidden_rgb, hidden_motion = [], []
        rgb = self._run(model, video, capture=hidden_rgb)  # (B, 2, D); tokens (B * 2, 1 + N, width)
        mot = self._run(self.motion.network, motion, capture=hidden_motion)
        out = {"rgb": rgb, "motion": mot,
               "rgb_stc": self._run(model, stc_mix(video[:, 0], donor, box)),
               "motion_stc": self._run(self.motion.network, stc_mix(motion[:, 0], donor, box))}

        def donor_tokens(hidden: torch.Tensor) -> torch.Tensor:  # view 0 of each clip's donor, (B, 1 + N, width)
            return hidden.unflatten(0, (B, 2))[:, 0][donor]

        def mixer(donated: torch.Tensor):
            def replace(tokens: torch.Tensor) -> torch.Tensor:  # (B, 1 + N, width)
                grid_tokens = tokens[:, 1:].unflatten(1, grid).clone()  # (B, t, h, w, width)
                grid_tokens[(slice(None), *token_box)] = donated[:, 1:].unflatten(1, grid)[(slice(None), *token_box)]
                return torch.cat([tokens[:, :1], grid_tokens.flatten(1, 3)], dim=1)
            return replace
        out["rgb_cmmc"] = self._run(model, video[:, 0], replace=mixer(donor_tokens(hidden_motion[-1])))
        out["motion_cmmc"] = self._run(self.motion.network, motion[:, 0], replace=mixer(donor_tokens(hidden_rgb[-1])))
        self.__dict__["mix"] = (donor, lam, token_lam)  # read by the loss of this step
        return out

    def forward(self, embeddings: dict, batch: dict):
        o, terms, loss = self.o, {}, 0.0
        rgb, mot = embeddings["rgb"].float(), embeddings["motion"].float()  # (B, 2, D)
        donor, lam, token_lam = self.mix
        if o.cross_weight > 0:
            terms["cross"] = nce_loss(rgb[:, 0], mot[:, 1], o.temperature)
            loss = loss + o.cross_weight * terms["cross"]
        if o.stc_weight > 0:
            terms["stc"] = 0.5 * (soft_contrast(embeddings["rgb_stc"].float(), rgb[:, 1], donor, lam, o.temperature)
                                  + soft_contrast(embeddings["motion_stc"].float(), mot[:, 1], donor, lam,
                                                  o.temperature))
            loss = loss + o.stc_weight * terms["stc"]
        if o.cmmc_weight > 0:
            terms["cmmc"] = 0.5 * (soft_contrast(embeddings["rgb_cmmc"].float(), mot[:, 1], donor, token_lam,
                                                 o.temperature)
                                   + soft_contrast(embeddings["motion_cmmc"].float(), rgb[:, 1], donor, token_lam,
                                                   o.temperature))
            loss = loss + o.cmmc_weight * terms["cmmc"]
        terms["lam"] = torch.tensor(lam)
        return loss, {k: v.detach() for k, v in terms.items()}
