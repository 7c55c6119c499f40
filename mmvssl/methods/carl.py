"""`carl`: CARL (Chen et al. 2022, "Frame-wise Action Representations for Long Videos via Sequence
Contrastive Learning"): frame-wise embeddings of two views of a video, trained with the sequence
contrastive loss (SCL).

- Views: two augmented views of overlapping windows (`data.sampler: same` with `data.num_clips: 2`,
  or `cvrl`); each view's [start, end] seconds come from batch["view_times"].
- Frame embeddings: the video transformer's tokens averaged per temporal position
  (`video_frames`, (B, V, t, width)), through the method's own MLP projection head
  (Linear-BN-ReLU-Linear, trained, checkpointed, never shipped), L2-normalised.
- Loss: for each temporal token i of view 1 the target over the tokens j of view 2 is a Gaussian
  prior over their time distance, p_ij = exp(-(t_i - t_j)^2 / (2 sigma^2)) / sum_j (...), with
  times in seconds (mmvssl.methods.views.token_times); the prediction is
  q_ij = softmax_j(z_i . z_j / tau); the loss is KL(p_i || q_i), averaged over tokens and clips, and
  symmetrised (view 2 against view 1). Only the other view's tokens of the same video are in the
  softmax (CARL's released default), so nothing is gathered across processes: each process's
  mean, averaged by DDP, is the mean over the global batch.

Departures from the paper: CARL embeds every frame with a 2-D ResNet and a temporal transformer;
here a "frame" is one temporal token of the video transformer (a tubelet of p frames), its time the
mean time of those frames. CARL's views are two random temporal crops with different sampling of
one long video; here they are the loader's windows (`same`: one window, two augmentations, so the
prior centres on the same token; `cvrl`: two windows at a random gap, which may not overlap, in
which case the prior still points at the nearest tokens in time). sigma is in seconds (CARL gives
its variance in frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from .base import BuildContext, Method, mlp
from .contrastive import build_student
from .views import token_times, view_windows


@dataclass
class CARLOptions:
    temperature: float = 0.1  # CARL's tau
    sigma: float = 1.0  # seconds: the Gaussian prior's standard deviation over time distance
    head_hidden: int = 512  # the frame head: Linear(width, hidden)-BN-ReLU-Linear(hidden, dim)
    head_dim: int = 128


def time_prior(times_a: torch.Tensor, times_b: torch.Tensor, sigma: float) -> torch.Tensor:
    """times_a (B, ta), times_b (B, tb) seconds -> (B, ta, tb): for each token of a, the normalised
    Gaussian weight exp(-(t_i - t_j)^2 / (2 sigma^2)) over the tokens j of b."""
    distance = times_a[:, :, None] - times_b[:, None, :]
    return torch.softmax(-distance.square() / (2 * sigma ** 2), dim=-1)


def sequence_contrastive_loss(a: torch.Tensor, b: torch.Tensor, times_a: torch.Tensor, times_b: torch.Tensor,
                              sigma: float, temperature: float) -> torch.Tensor:
    """a (B, ta, D), b (B, tb, D) normalised token embeddings of two views; mean over clips and over
    the tokens of a of KL(prior over b's tokens || softmax(a_i . b_j / tau) over j)."""
    prior = time_prior(times_a, times_b, sigma)  # (B, ta, tb)
    log_q = F.log_softmax(torch.einsum("bid,bjd->bij", a, b) / temperature, dim=-1)
    kl = (torch.xlogy(prior, prior) - prior * log_q).sum(dim=-1)  # (B, ta)
    return kl.mean()


class CARL(Method):
    name = "carl"
    paper = "CARL (Chen et al. 2022): frame-wise embeddings by sequence contrastive learning with a Gaussian time prior"
    Options = CARLOptions

    def __init__(self, options: CARLOptions, width: int, num_frames: int):
        super().__init__()
        if options.temperature <= 0 or options.sigma <= 0:
            raise ConfigError(f"method 'carl': method.options.temperature and sigma must be > 0 "
                              f"(got {options.temperature}, {options.sigma})")
        self.o, self.num_frames = options, num_frames
        self.frame_head = mlp(width, options.head_hidden, options.head_dim, batch_norm=True)
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        spec = ctx.spec
        if not (spec.sampler == "cvrl" or (spec.sampler == "same" and spec.num_clips == 2)):
            raise ConfigError(f"method 'carl' aligns the frames of two views: data.sampler '{spec.sampler}' with "
                              f"data.num_clips={spec.num_clips} does not give them "
                              f"(use same with num_clips=2, or cvrl)")
        net = build_student(cfg, ctx.accelerator)
        net.frame_features = True  # forward also returns video_frames (B, V, t, width)
        return net, cls(options, net.output_dims()["video_frames"], spec.num_frames)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.frame_head]

    def forward(self, embeddings: dict, batch: dict):
        frames = embeddings["video_frames"].float()  # (B, 2, t, width)
        z = F.normalize(self.frame_head(frames.flatten(0, 2)).view(*frames.shape[:3], -1), dim=-1)  # (B, 2, t, D)
        times = token_times(view_windows(batch, z.device), self.num_frames, z.shape[2])  # (B, 2, t)
        o = self.o
        loss = 0.5 * (sequence_contrastive_loss(z[:, 0], z[:, 1], times[:, 0], times[:, 1], o.sigma, o.temperature)
                      + sequence_contrastive_loss(z[:, 1], z[:, 0], times[:, 1], times[:, 0], o.sigma, o.temperature))
        return loss, {"scl": loss.detach()}
