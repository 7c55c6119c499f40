"""`maclr`: MaCLR (Xiao, Tighe and Modolo, ECCV 2022, "MaCLR: Motion-aware Contrastive Learning of
Representations for Videos"; first circulated as MoDist): the usual RGB-to-RGB contrast, enriched
with a cross-modal contrast between a visual pathway (RGB) and a motion pathway that exists only
for training.

As implemented:
- Views (`data.sampler: cvrl`): two clips of one video at a random gap. Each clip goes through the
  visual pathway (the model: encoder + projection head, `video_<space>`) and its motion input
  through the motion pathway (mmvssl/methods/motion_stream.py: `method.options.motion` = `tgrad`,
  the differences between consecutive decoded frames, or `flow`, the cached optical flow; a second
  network of the student's architecture with the motion input's channels, owned by the method).
- Flow edges (`flow_edges: true` with `motion: flow`, configs/methods/maclr_flow.yaml): the motion
  pathway reads the paper's motion input, the edges of the flow field, 1 channel: per frame the
  magnitude of the flow's spatial gradient, sqrt(|du/dx|^2 + |du/dy|^2 + |dv/dx|^2 + |dv/dy|^2)
  with each derivative a Sobel filter / 8 (a unit ramp has derivative 1), borders replicated
  (`flow_edges`). Edges are zero where the flow is constant (a camera pan moves every pixel
  alike) and large at the boundaries of moving objects, which is why the paper prefers them.
- Loss = visual_weight * NT-Xent(v_1, v_2) + motion_weight * NT-Xent(m_1, m_2)
  + cross_weight * (NCE(v_1, m_2) + NCE(v_2, m_1)) / 2, every term over the global batch.
  The cross-modal positives are the visual embedding of one clip and the motion embedding of the
  *other* clip of the same video: the clips' different times (MaCLR's temporal jitter) keep the
  visual pathway from matching its motion partner pixel by pixel (frame differences are computed
  from the very frames it sees). NCE is the symmetric InfoNCE (visual -> motion and back).
- The saved model is the visual pathway; the motion pathway is checkpointed in the method's
  state and dropped after training, as in the paper.

Departures from the paper: MaCLR's motion input is TV-L1 optical flow made into flow edges, its
backbones are S3D/R(2+1)D at 224 px, and it trains with MoCo-style momentum encoders and queues.
Here the default config's motion input is the frame differences (on the device; maclr_flow.yaml
takes the edges of cached OpenCV DIS flow instead of TV-L1's; the paper's text defining its edge
filter was not readable through this project's search, so the Sobel magnitude above is this
module's reading), the backbone is the config's preset, and the negatives are the global batch (as the
project's SimCLR and CVRL): the mechanism kept is the visual pathway learning from a motion
pathway's embeddings across clips. Both pathways use the one projection space `ssl` for every
term (the paper's projection heads per objective are not reproduced).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.contrastive import nce_loss, nt_xent_loss
from .base import BuildContext, Method, require_output
from .contrastive import build_student
from .motion_stream import (MotionPathway, build_motion_network, check_motion, check_motion_data, motion_input,
                            motion_modalities)


@dataclass
class MaCLROptions:
    motion: str = "tgrad"  # tgrad (frame differences, on the device) or flow (cached by `shards add-flow`)
    flow_edges: bool = False  # with motion=flow: the motion pathway reads the flow's edges (1 channel), as the paper
    visual_weight: float = 1.0  # RGB clip 1 vs RGB clip 2
    motion_weight: float = 1.0  # motion clip 1 vs motion clip 2 (trains the motion pathway on its own)
    cross_weight: float = 1.0  # RGB clip 1 vs motion clip 2 and RGB clip 2 vs motion clip 1
    temperature: float = 0.1
    space: str = "ssl"


# Sobel derivative along x (columns) / 8: the derivative of a unit ramp is 1; its transpose along y
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def flow_edges(flow: torch.Tensor) -> torch.Tensor:
    """Flow (..., 2, T, H, W) in pixels -> its edges (..., 1, T, H, W): per frame the magnitude of the
    spatial gradient of the flow field, sqrt(sum over u, v and x, y of the squared Sobel derivatives),
    borders replicated. Written here because the filter must run on the batch's device inside the
    training step (torchvision has no Sobel; OpenCV's works on host arrays, kornia is no dependency)."""
    if flow.ndim < 4 or flow.shape[-4] != 2:
        raise ValueError(f"flow_edges expects flow (..., 2, T, H, W), got {tuple(flow.shape)}")
    lead, (T, H, W) = flow.shape[:-4], flow.shape[-3:]
    planes = flow.float().movedim(-3, -4).reshape(-1, 1, H, W)  # (N * T * 2, 1, H, W): one component each
    kernel = torch.stack([SOBEL_X, SOBEL_X.T])[:, None].to(planes.device)  # (2, 1, 3, 3): d/dx, d/dy
    grad = F.conv2d(F.pad(planes, (1, 1, 1, 1), mode="replicate"), kernel)  # (N * T * 2, 2, H, W)
    edges = grad.square().reshape(-1, 2, 2, H, W).sum(dim=(1, 2)).sqrt()  # (N * T, H, W): u, v and x, y summed
    return edges.reshape(*lead, T, 1, H, W).movedim(-3, -4).to(flow.dtype)


def two_views(sampler: str, num_clips: int) -> bool:
    return sampler == "cvrl" or (sampler == "same" and num_clips == 2)


class MaCLR(Method):
    name = "maclr"
    paper = "MaCLR (Xiao et al. 2022): RGB-RGB contrast plus RGB-motion cross-modal contrast, motion pathway for training only"
    Options = MaCLROptions

    def __init__(self, motion_network: nn.Module, options: MaCLROptions):
        super().__init__()
        check_motion(options.motion, self.name)
        if options.flow_edges and options.motion != "flow":
            raise ConfigError(f"method 'maclr': method.options.flow_edges takes the edges of the cached optical flow: "
                              f"set method.options.motion=flow (got '{options.motion}')")
        if max(options.visual_weight, options.motion_weight, options.cross_weight) <= 0:
            raise ConfigError("method 'maclr': every loss weight is 0 (no loss)")
        self.o, self.key = options, f"video_{options.space}"
        self.motion = MotionPathway(motion_network, options.motion, self.key)
        self.modalities = motion_modalities(options.motion)

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        if not two_views(ctx.spec.sampler, ctx.spec.num_clips):
            raise ConfigError(f"method 'maclr' contrasts two clips of a video: data.sampler '{ctx.spec.sampler}' "
                              f"with data.num_clips={ctx.spec.num_clips} does not give 2 views (use cvrl)")
        check_motion_data(options.motion, ctx.spec, cls.name)
        net = build_student(cfg, ctx.accelerator)
        require_output(net, f"video_{options.space}", cls.name)
        channels = 1 if options.flow_edges else None  # flow edges: one channel
        return net, cls(build_motion_network(cfg, options.motion, cls.name, channels), options)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.motion.network]

    def embed(self, model: nn.Module, batch: dict) -> dict:
        visual = model({"video": batch["video"]})[self.key]  # (B, 2, D)
        if self.o.flow_edges:  # the flow's edges through the motion network
            self.motion.network.train(model.training)
            motion = self.motion.network({"video": flow_edges(motion_input(batch, "flow"))})[self.key]  # (B, 2, D)
        else:
            motion = self.motion(batch, model.training)  # (B, 2, D)
        return {self.key: visual, "motion": motion}

    def forward(self, embeddings: dict, batch: dict):
        o, terms, loss = self.o, {}, 0.0
        v, m = embeddings[self.key].float(), embeddings["motion"].float()
        if v.ndim != 3 or v.shape[1] != 2:
            raise ConfigError(f"method 'maclr' expects 2 views per clip, got embeddings {tuple(v.shape)}")
        if o.visual_weight > 0:
            terms["visual"] = nt_xent_loss(v[:, 0], v[:, 1], o.temperature)
            loss = loss + o.visual_weight * terms["visual"]
        if o.motion_weight > 0:
            terms["motion"] = nt_xent_loss(m[:, 0], m[:, 1], o.temperature)
            loss = loss + o.motion_weight * terms["motion"]
        if o.cross_weight > 0:
            terms["cross"] = 0.5 * (nce_loss(v[:, 0], m[:, 1], o.temperature) + nce_loss(v[:, 1], m[:, 0], o.temperature))
            loss = loss + o.cross_weight * terms["cross"]
        return loss, {k: t.detach() for k, t in terms.items()}
