"""`coclr`: CoCLR (Han, Xie and Zisserman, NeurIPS 2020, "Self-supervised Co-training for Video
Representation Learning"): an RGB stream and a motion stream, each first trained with InfoNCE on
its own, then co-trained: each stream mines positives for the other from its own nearest
neighbours, in alternation.

As implemented:
- Views (`data.sampler: same` with 2 clips): view 0 is the query clip, view 1 the key clip (two
  augmentations of one window). The RGB stream is the model; the motion stream is a network of the
  same architecture on the motion input (`method.options.motion`: `tgrad`, frame differences
  computed on the device, or `flow`, the cached optical flow; mmvssl/methods/motion_stream.py),
  owned by the method. Each stream has a MoCo key encoder (an EMA of its query network, momentum
  `momentum`) and a queue of `queue_size` keys; the two queues are filled together, so row j of
  both is the same clip.
- Phases, by the number of steps taken (a schedule of the step: a resumed run continues it):
  the first `init_steps` train both streams with InfoNCE (positive: the clip's own key, negatives:
  the queue). Then phases of `cycle_steps` alternate, RGB first: in an RGB phase the RGB query is
  trained with positives mined by the motion stream, which takes no gradient (it is not run with
  autograd, and its key encoder is not updated); in a motion phase, the other way round.
- Mining (`mine_positives`): for clip i, the positive set is its own key plus the `topk` queue
  entries whose *other-stream* keys are most similar to clip i's other-stream key; the loss is
  CoCLR's multi-instance InfoNCE, -log(sum over positives of exp(q.k / tau) / sum over all of
  exp(q.k / tau)).
- Keys of every process are gathered and enqueued after each step (MoCo); the queue, its pointer,
  the key encoders and the motion stream are the method's state (method.safetensors). The saved
  model is the RGB stream.

Departures from the paper: CoCLR trains the two streams apart (stage 1: each its own InfoNCE run),
then runs co-training cycles of many epochs with the other network frozen and loaded from disk;
here one run holds both, with the stages as step ranges (`init_steps`, `cycle_steps`), which the
tiny configs set short. The motion input is frame differences (or cached OpenCV flow) instead of
TV-L1 flow, the backbone is the config's preset instead of S3D, and MoCo's shuffled BatchNorm is
not reproduced (the transformer presets normalise with LayerNorm; only the stem and the projection
head have BatchNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..errors import ConfigError
from ..losses.gather import gather_no_grad
from .base import BuildContext, Method, ema_update, frozen_copy, unwrap
from .motion_stream import (MotionPathway, build_motion_network, build_same_window_student, check_motion,
                            motion_modalities)

STREAMS = ("rgb", "motion")


@dataclass
class CoCLROptions:
    motion: str = "tgrad"  # tgrad (frame differences, on the device) or flow (cached by `shards add-flow`)
    queue_size: int = 2048  # CoCLR: 2048 on UCF101
    topk: int = 5  # positives mined from the other stream's neighbours (CoCLR's K = 5)
    temperature: float = 0.07
    momentum: float = 0.999  # MoCo key encoders
    init_steps: int = 200  # stage 1: both streams with InfoNCE alone
    cycle_steps: int = 100  # then alternate: RGB mined by motion, motion mined by RGB, ...
    space: str = "ssl"


def mine_positives(other_key: torch.Tensor, other_queue: torch.Tensor, topk: int) -> torch.Tensor:
    """CoCLR's positive set from the other stream: other_key (B, D) the clips' keys in the other
    stream, other_queue (K, D) its queue -> (B, 1 + K) bool: column 0 (the clip's own key) and the
    `topk` queue entries nearest to the clip in the other stream."""
    similarity = other_key @ other_queue.T  # (B, K)
    nearest = similarity.topk(min(topk, other_queue.shape[0]), dim=1).indices
    mask = torch.zeros(other_key.shape[0], 1 + other_queue.shape[0], dtype=torch.bool, device=other_key.device)
    mask[:, 0] = True
    mask.scatter_(1, nearest + 1, True)
    return mask


def multi_instance_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, positives: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """query, key (B, D), queue (K, D), positives (B, 1 + K) bool over [own key, queue] ->
    mean over clips of -log(sum_{p in P} exp(q.k_p / tau) / sum_all exp(q.k / tau)); with only the own
    key positive this is MoCo's InfoNCE."""
    logits = torch.cat([(query * key).sum(-1, keepdim=True), query @ queue.T], dim=1) / temperature  # (B, 1 + K)
    log_prob = F.log_softmax(logits, dim=1)
    return -torch.logsumexp(log_prob.masked_fill(~positives, float("-inf")), dim=1).mean()


class CoCLR(Method):
    name = "coclr"
    paper = "CoCLR (Han et al. 2020): InfoNCE per stream, then co-training with positives mined from the other stream"
    Options = CoCLROptions

    def __init__(self, student: nn.Module, motion_network: nn.Module, options: CoCLROptions):
        super().__init__()
        check_motion(options.motion, self.name)
        if options.queue_size < 1 or options.topk < 1 or options.cycle_steps < 1 or options.init_steps < 0:
            raise ConfigError(f"method 'coclr': queue_size, topk and cycle_steps must be positive and init_steps "
                              f">= 0 (got {options.queue_size}, {options.topk}, {options.cycle_steps}, "
                              f"{options.init_steps})")
        self.o, self.key = options, f"video_{options.space}"
        self.motion = MotionPathway(motion_network, options.motion, self.key)
        self.rgb_key_encoder = frozen_copy(student)
        self.motion_key_encoder = MotionPathway(frozen_copy(motion_network), options.motion, self.key)
        dim = student.output_dims()[self.key]
        self.register_buffer("queue_rgb", F.normalize(torch.randn(options.queue_size, dim), dim=1))
        self.register_buffer("queue_motion", F.normalize(torch.randn(options.queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # steps taken: the phase schedule
        self.modalities = motion_modalities(options.motion)
        self.__dict__["pending_keys"] = None  # (rgb, motion) keys of the last loss, enqueued after the step

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        net = build_same_window_student(cls, cfg, ctx, options, "contrasts a query and a key view of each clip")
        return net, cls(net, build_motion_network(cfg, options.motion, cls.name), options)

    def decayed_modules(self) -> list[nn.Module]:
        return [self.motion.network]

    def phase(self, steps_taken: int | None = None) -> str:
        """'init' (both streams, InfoNCE), then 'rgb' and 'motion' alternating every cycle_steps."""
        s = int(self.step) if steps_taken is None else steps_taken
        if s < self.o.init_steps:
            return "init"
        return STREAMS[((s - self.o.init_steps) // self.o.cycle_steps) % 2]

    def trains(self, stream: str) -> bool:
        return self.phase() in ("init", stream)

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Queries of the trained stream(s) (view 0), keys of both streams (view 1, no gradient)."""
        video = batch["video"]  # (B, 2, C, T, H, W)
        if video.ndim != 6 or video.shape[1] != 2:
            raise ConfigError(f"method 'coclr' expects 2 views per clip (B, 2, C, T, H, W), got {tuple(video.shape)}")
        query_view = {k: v[:, 0] for k, v in batch.items() if k in ("video", "flow")}
        key_view = {k: v[:, 1] for k, v in batch.items() if k in ("video", "flow")}
        out = {}
        if self.trains("rgb"):
            out["rgb_query"] = model({"video": query_view["video"]})[self.key]  # (B, D)
        if self.trains("motion"):
            out["motion_query"] = self.motion(query_view, model.training)
        with torch.no_grad():
            self.rgb_key_encoder.train(model.training)
            out["rgb_key"] = self.rgb_key_encoder({"video": key_view["video"]})[self.key]
            out["motion_key"] = self.motion_key_encoder(key_view, model.training)
        return out

    def forward(self, embeddings: dict, batch: dict):
        phase, terms, loss = self.phase(), {}, 0.0
        keys = {s: embeddings[f"{s}_key"].detach().float() for s in STREAMS}
        queues = {"rgb": self.queue_rgb.clone(), "motion": self.queue_motion.clone()}
        for stream, other in (("rgb", "motion"), ("motion", "rgb")):
            if not self.trains(stream):
                continue
            query = embeddings[f"{stream}_query"].float()
            if phase == "init":
                positives = torch.zeros(query.shape[0], 1 + queues[stream].shape[0], dtype=torch.bool,
                                        device=query.device)
                positives[:, 0] = True
            else:
                positives = mine_positives(keys[other], queues[other], self.o.topk)
            terms[f"{stream}_nce"] = multi_instance_nce(query, keys[stream], queues[stream], positives,
                                                        self.o.temperature)
            loss = loss + terms[f"{stream}_nce"]
        self.__dict__["pending_keys"] = (keys["rgb"], keys["motion"])
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def enqueue(self, rgb: torch.Tensor, motion: torch.Tensor) -> None:
        """Both streams' keys of the global batch into their queues at the same rows (oldest replaced)."""
        rgb, motion = gather_no_grad(rgb.contiguous()), gather_no_grad(motion.contiguous())
        K, n = self.queue_rgb.shape[0], rgb.shape[0]
        rows = (int(self.queue_ptr) + torch.arange(n, device=rgb.device)) % K
        if n > K:  # a batch larger than the queue: its last K keys
            rows, rgb, motion = rows[-K:], rgb[-K:], motion[-K:]
        self.queue_rgb[rows] = rgb.to(self.queue_rgb.dtype)
        self.queue_motion[rows] = motion.to(self.queue_motion.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % K)

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Key encoders of the streams just trained follow their queries; keys enqueued; step counted."""
        if self.trains("rgb"):
            ema_update(self.rgb_key_encoder, unwrap(model), self.o.momentum)
        if self.trains("motion"):
            ema_update(self.motion_key_encoder.network, self.motion.network, self.o.momentum)
        if self.pending_keys is not None:
            self.enqueue(*self.pending_keys)
            self.__dict__["pending_keys"] = None
        self.step.fill_(step)

    def log_values(self) -> dict[str, float]:
        """The phase of the step just taken (logged after it): 0 init, 1 RGB trained, 2 motion trained."""
        return {"phase": float({"init": 0, "rgb": 1, "motion": 2}[self.phase(max(0, int(self.step) - 1))])}
