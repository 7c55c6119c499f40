"""`carl`: CARL (Chen et al. 2022, "Frame-wise Action Representations for Long Videos via Sequence
Contrastive Learning"): frame-wise embeddings of two views of a video, trained with the sequence
contrastive loss (SCL).

- Views (`data.sampler: carl`, mmvssl.data.sampling.carl_windows, after CARL's 'time_augment' in
  minghchen/CARL_code datasets/penn_action.py `sample_frames`): two temporal crops of one video, each
  U[1, `data.long_scale`] x the window long (CARL's SAMPLING_REGION 1.5), the second starting
  within 0.8 of the first's length of it (CONSISTENT_OFFSET 0.2), each decoded as `data.num_frames`
  frames, so the two differ in length and frame rate; each view's [start, end] seconds come from
  batch["view_times"]. `cvrl` (two clips of one length at a random gap) is accepted too; `same` is
  refused: one window twice puts every prior on the same token, which position embeddings solve.
- Frame embeddings: the video transformer's tokens averaged per temporal position
  (`video_frames`, (B, V, t, width)), through the method's own MLP projection head
  (Linear-BN-ReLU-Linear, trained, checkpointed, never shipped), L2-normalised.
- Loss: CARL's SCL as minghchen/CARL_code @ c574312 algos/scl.py `SCL.compute_sequence_loss`
  (POSITIVE_TYPE gauss, NEGATIVE_TYPE single_noself; `sequence_contrastive_loss`, checked against the
  official numbers in tests/parity/carl.py). Each temporal token is a frame at position
  t * data.fps (t its time in seconds, mmvssl.methods.views.token_times); its target over the other
  view's tokens is a Gaussian in their distance with variance `label_variance` (CARL's
  LABEL_VARIENCE, frames squared), row-normalised; the prediction is exp(z_i . z_j / tau) over the
  other view's tokens only; the loss is the KL divergence (target entropy included) with 1e-6
  inside the log, summed over both views' tokens and divided by their number. Nothing is gathered
  across processes: each process's mean, averaged by DDP, is the mean over the global batch.

Departures from the paper: CARL embeds every frame with a 2-D ResNet and a temporal transformer;
here a "frame" is one temporal token of the video transformer (a tubelet of p frames), its time the
mean time of those frames. CARL's crops cover 1 to 1.5 x the whole (short, trimmed) video with
frames past its end masked, and take a random sorted subset of the crop's frames; here a crop is a
window of 1 to `long_scale` x the clip window inside a long video, its frames evenly spaced. CARL counts positions in the
video's own frames; here in frames at data.fps (one grid for both views), and clips have no padding
(CARL pads videos shorter than its frame count and masks them; the loss takes such masks).
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
    temperature: float = 0.1  # CARL's SOFTMAX_TEMPERATURE
    # CARL's LABEL_VARIENCE (a variance, not a standard deviation), in frames at data.fps squared
    label_variance: float = 10.0
    head_hidden: int = 512  # the frame head: Linear(width, hidden)-BN-ReLU-Linear(hidden, dim)
    head_dim: int = 128


def sequence_contrastive_terms(embs: torch.Tensor, steps: torch.Tensor, seq_lens: torch.Tensor,
                               masks: torch.Tensor, label_variance: float, temperature: float
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """CARL's SCL before the reduction, on N = 2 B T rows indexed n = (b * 2 + view) * T + t.

    embs (B, 2, T, C) frame embeddings, steps (B, 2, T) frame positions, seq_lens (B, 2) video
    lengths in the same unit, masks (B, 2, T) 1 for real frames -> (log_prob, label), both (N, N):
    log_prob = log(p + 1e-6) with p_ij = exp(l_ij) / sum_k w_ik exp(l_ik), l = E E^T / temperature,
    w = 1 on the other view of the same video, 0 elsewhere, 1e-6 on every pair with a padded frame;
    label = the Gaussian exp(-d^2 / (2 label_variance)) over the other view of the same video,
    row-normalised (0 on padded rows), d_ij = |steps_i / len_i * len_j - steps_j| (1e6 with padding).
    """
    B, V, T, C = embs.shape
    n = B * V * T
    z = embs.reshape(n, C)
    logits = z @ z.T / temperature  # (N, N)
    video = torch.arange(B, device=z.device).repeat_interleave(V * T)  # (N,)
    view = torch.arange(V, device=z.device).repeat_interleave(T).repeat(B)
    other_view = (video[:, None] == video[None, :]) & (view[:, None] != view[None, :])  # (N, N)
    real = masks.reshape(n) > 0
    real_pair = real[:, None] & real[None, :]
    pos = steps.reshape(n).to(z.dtype)
    length = seq_lens.to(z.dtype)[:, :, None].expand(B, V, T).reshape(n)
    distance = (pos[:, None] / length[:, None] * length[None, :] - pos[None, :]).abs()
    distance = distance.masked_fill(~real_pair, 1e6)
    gauss = torch.exp(-distance.square() / (2 * label_variance)) * other_view
    total = gauss.sum(dim=1, keepdim=True)
    label = torch.where(total > 0, gauss / total.clamp_min(torch.finfo(z.dtype).tiny), torch.zeros_like(gauss))
    weights = other_view.to(z.dtype).masked_fill(~real_pair, 1e-6)
    # CARL exponentiates the logits directly; shifting by the row maximum is the same ratio, and keeps
    # exp finite at small temperatures
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
    prob = shifted.exp() / (weights * shifted.exp()).sum(dim=1, keepdim=True)
    return torch.log(prob + 1e-6), label


def sequence_contrastive_loss(embs: torch.Tensor, steps: torch.Tensor, seq_lens: torch.Tensor, masks: torch.Tensor,
                              label_variance: float, temperature: float) -> torch.Tensor:
    """CARL's SCL (minghchen/CARL_code algos/scl.py, gauss / single_noself): the KL divergence of
    sequence_contrastive_terms' label from its prediction, target entropy included, summed over the
    pairs of real frames and divided by the number of real frames."""
    log_prob, label = sequence_contrastive_terms(embs, steps, seq_lens, masks, label_variance, temperature)
    real = masks.reshape(-1) > 0
    kl = torch.xlogy(label, label) - label * log_prob  # (N, N); 0 where the label is 0
    return (kl * (real[:, None] & real[None, :])).sum() / masks.sum()


class CARL(Method):
    name = "carl"
    paper = "CARL (Chen et al. 2022): frame-wise embeddings by sequence contrastive learning with a Gaussian time prior"
    Options = CARLOptions

    def __init__(self, options: CARLOptions, width: int, num_frames: int, fps: float = 4.0):
        super().__init__()
        if options.temperature <= 0 or options.label_variance <= 0:
            raise ConfigError(f"method 'carl': method.options.temperature and label_variance must be > 0 "
                              f"(got {options.temperature}, {options.label_variance})")
        self.o, self.num_frames, self.fps = options, num_frames, fps
        self.frame_head = mlp(width, options.head_hidden, options.head_dim, batch_norm=True)
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        spec = ctx.spec
        if spec.sampler not in ("carl", "cvrl"):
            raise ConfigError(f"method 'carl' aligns the frames of two views: data.sampler '{spec.sampler}' with "
                              f"data.num_clips={spec.num_clips} does not give two temporal crops "
                              f"(use carl, or cvrl)")
        net = build_student(cfg, ctx.accelerator)
        net.frame_features = True  # forward also returns video_frames (B, V, t, width)
        return net, cls(options, net.output_dims()["video_frames"], spec.num_frames, spec.fps)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.frame_head]

    def forward(self, embeddings: dict, batch: dict):
        frames = embeddings["video_frames"].float()  # (B, 2, t, width)
        z = F.normalize(self.frame_head(frames.flatten(0, 2)).view(*frames.shape[:3], -1), dim=-1)  # (B, 2, t, D)
        times = token_times(view_windows(batch, z.device), self.num_frames, z.shape[2])  # (B, 2, t)
        # CARL's frame positions: times in frames at data.fps; both views are of one video (one length)
        steps = times * self.fps
        length = torch.ones(z.shape[0], 2, dtype=z.dtype, device=z.device)
        real = torch.ones(z.shape[:3], dtype=z.dtype, device=z.device)
        loss = sequence_contrastive_loss(z, steps, length, real, self.o.label_variance, self.o.temperature)
        return loss, {"scl": loss.detach()}
