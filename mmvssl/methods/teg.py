"""`teg`: TeG (Qian et al. 2021, arXiv 2112.04480, "Exploring Temporal Granularity in Self-Supervised
Video Representation Learning"): a long clip and a short clip inside it; a fine-grained (dense) loss
matches the short clip's per-time embeddings to the long clip's at the same times, and a
persistent (clip-level) loss pulls the two clips' embeddings together.

- Views (`data.sampler: teg`, mmvssl.data.sampling.long_short_windows): the short clip, `data.num_frames`
  frames at `data.fps`, in `video`; the long clip, `data.long_scale` x as long at the same rate (so
  long_scale x the frames), in the view group `video/long`; the short clip starts a multiple of 4
  frames (sampling.TEG_GRID_FRAMES) after the long one, inside it. With one rate and a temporal tubelet
  p that divides 4, every temporal token of the short clip merges exactly the frames of one token of
  the long clip: the token "at the same time" is at the same time, not the nearest one.
- Dense embeddings: the video transformer's tokens averaged per temporal position
  (`video_frames`, (B, 1, t, width) per clip), through the method's own MLP head
  (Linear-BN-ReLU-Linear, trained, checkpointed, never shipped), L2-normalised.
- Dense loss: every temporal token of the short clip is an anchor of InfoNCE at
  `dense_temperature`; its positive is the long clip's token at its time (token times from the
  views' windows in batch["view_times"], mmvssl.methods.views; the nearest in time, which the grid
  makes the same time); its negatives are every other temporal token of every long clip of the
  global batch (the same clip's other times and other videos'), gathered across processes.
- Persistent loss: NT-Xent (losses/contrastive.py) between the two clips' `video_<space>`
  embeddings at `clip_temperature`.
- loss = dense_weight * dense + clip_weight * persistent; a term is on when its weight is positive.

Reference: no official code of TeG found public after looking (the code index searched by the paper's
title, "temporal granularity", and the long/short-clip dense loss; nothing by its authors), so the
module follows the paper. Departures: TeG's backbones are 3-D CNNs whose last stage keeps a
temporal axis; here the dense embeddings are the transformer's per-time token means, so a "time
step" is one tubelet (p frames) wide. Clip lengths, frame rates and temperatures are this config's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.contrastive import global_mean, nt_xent_loss
from ..losses.gather import gather_no_grad, gather_with_grad, world
from ..modalities import group_key
from .base import BuildContext, Method, mlp, require_output
from .contrastive import build_student
from .views import token_times, view_windows


@dataclass
class TeGOptions:
    dense_weight: float = 1.0  # fine-grained temporal loss
    clip_weight: float = 1.0  # persistent temporal loss
    dense_temperature: float = 0.1
    clip_temperature: float = 0.1
    head_hidden: int = 512  # the dense head: Linear(width, hidden)-BN-ReLU-Linear(hidden, dim)
    head_dim: int = 128
    space: str = "ssl"  # the clip embedding `video_<space>`


def aligned_positions(short_times: torch.Tensor, long_times: torch.Tensor) -> torch.Tensor:
    """short_times (B, ts), long_times (B, tl) seconds -> (B, ts): the index of the long clip's
    token nearest in time to each short-clip token (the first on a tie)."""
    return (short_times[:, :, None] - long_times[:, None, :]).abs().argmin(dim=-1)


def teg_dense_loss(short: torch.Tensor, long: torch.Tensor, positive: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """short (B, ts, D), long (B, tl, D), normalised; positive (B, ts) indices into the same clip's
    tl tokens. InfoNCE of every short token against every long token of the global batch; the
    mean over anchors of every process (each process returns its share, as losses/contrastive.py)."""
    B, ts, D = short.shape
    tl = long.shape[1]
    rank, _ = world()
    candidates = gather_with_grad(long.reshape(B * tl, D))  # (N * tl, D)
    logits = short.reshape(B * ts, D) @ candidates.T / temperature  # (B * ts, N * tl)
    clip = torch.arange(B, device=short.device)[:, None] + rank * B  # (B, 1) global clip index
    target = (clip * tl + positive).reshape(-1)  # (B * ts,)
    per_anchor = F.cross_entropy(logits, target, reduction="none")
    ones = torch.ones_like(per_anchor)
    return global_mean(per_anchor, ones, gather_no_grad(ones))


class TeG(Method):
    name = "teg"
    paper = "TeG (Qian et al. 2021, arXiv 2112.04480): a short clip's per-time embeddings matched to the long clip around it"
    Options = TeGOptions

    def __init__(self, options: TeGOptions, width: int, num_frames: int, long_frames: int | None = None):
        super().__init__()
        if options.dense_weight <= 0 and options.clip_weight <= 0:
            raise ConfigError("method 'teg': method.options.dense_weight and clip_weight are both 0 (no loss)")
        if min(options.dense_temperature, options.clip_temperature) <= 0:
            raise ConfigError("method 'teg': method.options dense_temperature and clip_temperature must be > 0")
        self.o, self.num_frames = options, num_frames
        self.long_frames = long_frames or 2 * num_frames
        self.key = f"video_{options.space}"
        self.frame_head = mlp(width, options.head_hidden, options.head_dim, batch_norm=True)
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        from ..data.sampling import TEG_GRID_FRAMES
        options = cls.options(cfg)
        spec = ctx.spec
        if spec.sampler != "teg":
            raise ConfigError(f"method 'teg' matches a short clip inside a long one: data.sampler '{spec.sampler}' "
                              f"does not give them (use teg)")
        net = build_student(cfg, ctx.accelerator)
        dims = require_output(net, f"video_{options.space}", cls.name)
        tubelet = int(getattr(net.encoders["video"], "patch", (1,))[0])
        long_frames = spec.groups["long"][1]
        if TEG_GRID_FRAMES % tubelet or spec.num_frames % tubelet or long_frames % tubelet:
            raise ConfigError(f"method 'teg': the video tubelet of {tubelet} frames must divide "
                              f"{TEG_GRID_FRAMES} (the short clip's frame grid in the long one), data.num_frames "
                              f"({spec.num_frames}) and the long clip's {long_frames} frames, so that tokens align")
        net.frame_features = True  # forward also returns video_frames (B, V, t, width)
        return net, cls(options, dims["video_frames"], spec.num_frames, long_frames)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.frame_head]

    def dense_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, V, t, width) token means -> (B, V, t, head_dim), normalised."""
        return F.normalize(self.frame_head(frames.flatten(0, 2)).view(*frames.shape[:3], -1), dim=-1)

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The short clip (`video`) and the long one (`video/long`), each through the model."""
        short = model({"video": batch["video"]})  # (B, 1, ...)
        long = model({"video": batch[group_key("video", "long")]})  # (B, 1, ...) with long_frames frames
        return {"short": short[self.key][:, 0], "long": long[self.key][:, 0],  # (B, D)
                "short_frames": short["video_frames"][:, 0], "long_frames": long["video_frames"][:, 0]}  # (B, t, w)

    def forward(self, embeddings: dict, batch: dict):
        terms, loss = {}, 0.0
        if self.o.dense_weight > 0:
            short = self.dense_embeddings(embeddings["short_frames"].float()[:, None])[:, 0]  # (B, ts, D)
            long = self.dense_embeddings(embeddings["long_frames"].float()[:, None])[:, 0]  # (B, tl, D)
            windows = view_windows(batch, short.device)  # (B, 2, 2): [short, long]
            short_times = token_times(windows[:, 0], self.num_frames, short.shape[1])  # (B, ts)
            long_times = token_times(windows[:, 1], self.long_frames, long.shape[1])  # (B, tl)
            positive = aligned_positions(short_times, long_times)  # (B, ts)
            terms["dense"] = teg_dense_loss(short, long, positive, self.o.dense_temperature)
            loss = loss + self.o.dense_weight * terms["dense"]
        if self.o.clip_weight > 0:
            terms["persistent"] = nt_xent_loss(embeddings["long"].float(), embeddings["short"].float(),
                                               self.o.clip_temperature)
            loss = loss + self.o.clip_weight * terms["persistent"]
        return loss, {k: v.detach() for k, v in terms.items()}
