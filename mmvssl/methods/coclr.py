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
- Positives (`mine_positives`, as TengdaHan/CoCLR @ 45f200e model/pretrain.py `CoCLR.forward`):
  clip i's own key, every queue entry cut from the same source video (the queue keeps each
  entry's video id, `queue_video`; ids come from the data, `video_ids`: the metadata's `video_id`,
  else its `source`, else the key), and -- only once the queue is full -- the `topk` entries of
  other videos whose other-stream keys are most similar to clip i's other-stream key. The loss is
  main_coclr.py's multi_nce_loss, -log of the softmax mass on the positives; in 90% of the steps
  the own key leaves the positives of every row that has another (main_coclr.py's self-masking).
  That draw comes from a generator seeded by (the run's seed, the step), `self_mask_draw`, never
  from torch's global generator, so a resumed run draws what the uninterrupted one drew.
  Checked against the official numbers in tests/parity/coclr.py.
- The frozen stream's key encoder runs in eval mode (CoCLR's `sampler.eval()`): its batch-norm
  statistics do not move while the other stream trains.
- Keys of every process are gathered and enqueued after each step (MoCo); the queue, its pointer,
  the key encoders and the motion stream are the method's state (method.safetensors). The saved
  model is the RGB stream.

Departures from the paper: CoCLR trains the two streams apart (stage 1: each its own InfoNCE run),
then runs co-training cycles of many epochs with the other network frozen and loaded from disk;
here one run holds both, with the stages as step ranges (`init_steps`, `cycle_steps`), which the
tiny configs set short. The miner is the frozen stream's key encoder (an EMA of its query network)
where CoCLR loads the other stream's query network, and the queue carries over between phases
(CoCLR refills it each cycle, as a new process), so mining starts with the first co-training step
once the init phase has filled it. The motion input is frame differences (or cached OpenCV flow)
instead of TV-L1 flow, the backbone is the config's preset instead of S3D, and MoCo's shuffled BatchNorm is
not reproduced (the transformer presets normalise with LayerNorm; only the stem and the projection
head have BatchNorm).
"""

from __future__ import annotations

import hashlib
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
UNKNOWN_VIDEO = -2  # queue_video of rows written without a video id (never a positive)
SELF_MASK_PROBABILITY = 0.9  # main_coclr.py: the own key leaves the positives in 90% of the steps


def self_mask_draw(seed: int, step: int) -> bool:
    """Whether step `step` (1 for the first step taken) drops the own key from the positives (CoCLR's
    self-masking, main_coclr.py train_one_epoch: with probability SELF_MASK_PROBABILITY). Drawn from a
    generator seeded by (seed, step) alone -- as the loader seeds each sample's draws by its place in
    the stream -- so a run resumed at any step draws what the uninterrupted run drew there, and every
    process draws the same."""
    digest = hashlib.blake2b(f"coclr-self-mask/{seed}/{step}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))
    return bool(torch.rand((), generator=generator) < SELF_MASK_PROBABILITY)


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


def video_ids(batch: dict) -> torch.Tensor:
    """(B,) int64 >= 0: the source video of each sample, from the data. The metadata's `video_id` when
    the dataset gives one (e.g. UCF101's group, CoCLR's video_source.json), else its `source` (the
    file the shard builder read: clips it cut from one video share it), else the sample key. Hashed
    with BLAKE2b, the same id in every process and run."""
    metas = batch.get("meta") or [{} for _ in batch.get("key", ())]
    keys = batch.get("key") or [None] * len(metas)
    ids = []
    for meta, key in zip(metas, keys):
        name = (meta or {}).get("video_id") or (meta or {}).get("source") or key
        if name is None:
            raise ConfigError("method 'coclr' needs the source video of each sample: the batch has neither "
                              "meta['video_id'], meta['source'] nor a key")
        digest = hashlib.blake2b(str(name).encode(), digest_size=8).digest()
        ids.append(int.from_bytes(digest, "little") & (2 ** 63 - 1))
    return torch.tensor(ids, dtype=torch.long)


def same_video_mask(video: torch.Tensor, queue_video: torch.Tensor) -> torch.Tensor:
    """video (B,) the clips' source videos, queue_video (K,) the queue rows' -> (B, K) bool: the rows
    cut from each clip's video (CoCLR's mask_source; ids below 0 never match)."""
    return (video[:, None] == queue_video[None, :]) & (video[:, None] >= 0)


def mine_positives(other_key: torch.Tensor, other_queue: torch.Tensor, topk: int,
                   same_video: torch.Tensor | None = None, queue_full: bool = True) -> torch.Tensor:
    """CoCLR's positive set (TengdaHan/CoCLR model/pretrain.py `CoCLR.forward`): other_key (B, D) the
    clips' keys in the other stream, other_queue (K, D) its queue, same_video (B, K) the queue
    entries cut from each clip's source video -> (B, 1 + K) bool over [own key, queue]: the own key,
    every same-video entry, and -- once the queue is full -- the `topk` entries nearest to the clip in
    the other stream among those of other videos."""
    B, K = other_key.shape[0], other_queue.shape[0]
    if same_video is None:
        same_video = torch.zeros(B, K, dtype=torch.bool, device=other_key.device)
    mask = same_video.clone()
    if queue_full and topk > 0:
        similarity = (other_key @ other_queue.T).masked_fill(same_video, float("-inf"))  # (B, K)
        nearest = similarity.topk(min(topk, K), dim=1).indices
        mask.scatter_(1, nearest, True)
    return torch.cat([torch.ones(B, 1, dtype=torch.bool, device=mask.device), mask], dim=1)


def drop_self(positives: torch.Tensor) -> torch.Tensor:
    """CoCLR's self-masking (main_coclr.py train_one_epoch): column 0 (the own key) removed from the
    rows that have another positive."""
    out = positives.clone()
    out[:, 0] &= positives.sum(dim=1) == 1
    return out


def coclr_logits(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """query, key (B, D), queue (K, D), all L2-normalised -> (B, 1 + K): [q . k, q . queue] / tau."""
    return torch.cat([(query * key).sum(-1, keepdim=True), query @ queue.T], dim=1) / temperature


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """CoCLR's multi_nce_loss: mean over rows of -log(sum of softmax(logits) over the positives); with
    only the own key positive this is MoCo's InfoNCE."""
    log_prob = F.log_softmax(logits, dim=1)
    return -torch.logsumexp(log_prob.masked_fill(~positives, float("-inf")), dim=1).mean()


def multi_instance_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, positives: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """multi_positive_nce of coclr_logits(query, key, queue, temperature)."""
    return multi_positive_nce(coclr_logits(query, key, queue, temperature), positives)


@torch.no_grad()
def enqueue_rows(queues: list[torch.Tensor], values: list[torch.Tensor], ptr: int) -> int:
    """MoCo's dequeue-and-enqueue on queues that share rows (K, ...): the global batch's `values`
    (this process's rows, gathered from every process) written at rows ptr, ptr + 1, ... (mod K,
    oldest replaced); returns the new pointer."""
    values = [gather_no_grad(v.contiguous()) for v in values]
    K, n = queues[0].shape[0], values[0].shape[0]
    rows = (ptr + torch.arange(n, device=queues[0].device)) % K
    if n > K:  # a batch larger than the queue: its last K rows
        rows, values = rows[-K:], [v[-K:] for v in values]
    for queue, value in zip(queues, values):
        queue[rows] = value.to(queue.dtype)
    return (ptr + n) % K


class CoCLR(Method):
    name = "coclr"
    paper = "CoCLR (Han et al. 2020): InfoNCE per stream, then co-training with positives mined from the other stream"
    Options = CoCLROptions

    def __init__(self, student: nn.Module, motion_network: nn.Module, options: CoCLROptions, seed: int = 0):
        super().__init__()
        check_motion(options.motion, self.name)
        if options.queue_size < 1 or options.topk < 1 or options.cycle_steps < 1 or options.init_steps < 0:
            raise ConfigError(f"method 'coclr': queue_size, topk and cycle_steps must be positive and init_steps "
                              f">= 0 (got {options.queue_size}, {options.topk}, {options.cycle_steps}, "
                              f"{options.init_steps})")
        self.o, self.key, self.seed = options, f"video_{options.space}", int(seed)  # seed: the self-masking draws
        self.motion = MotionPathway(motion_network, options.motion, self.key)
        self.rgb_key_encoder = frozen_copy(student)
        self.motion_key_encoder = MotionPathway(frozen_copy(motion_network), options.motion, self.key)
        dim = student.output_dims()[self.key]
        self.register_buffer("queue_rgb", F.normalize(torch.randn(options.queue_size, dim), dim=1))
        self.register_buffer("queue_motion", F.normalize(torch.randn(options.queue_size, dim), dim=1))
        # the source video of each queue row (CoCLR's queue_vname and queue_label): -1 never written,
        # UNKNOWN_VIDEO written from a clip whose video is unknown (a batch built by hand)
        self.register_buffer("queue_video", torch.full((options.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # steps taken: the phase schedule
        self.modalities = motion_modalities(options.motion)
        self.__dict__["pending_keys"] = None  # (rgb, motion, video) of the last loss, enqueued after the step

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        net = build_same_window_student(cls, cfg, ctx, options, "contrasts a query and a key view of each clip")
        return net, cls(net, build_motion_network(cfg, options.motion, cls.name), options, ctx.spec.seed or 0)

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

    def drops_own_key(self) -> bool:
        """The self-masking draw of the step being taken (steps taken + 1): self_mask_draw."""
        return self_mask_draw(self.seed, int(self.step) + 1)

    def prepare(self, batch: dict) -> dict:
        device = batch["video"].device if "video" in batch else None
        batch["video_id"] = video_ids(batch).to(device)  # (B,) the source video of each clip
        return batch

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Queries of the trained stream(s) (view 0), keys of both streams (view 1, no gradient)."""
        video = batch["video"]  # (B, 2, C, T, H, W)
        if video.ndim != 6 or video.shape[1] != 2:
            raise ConfigError(f"method 'coclr' expects 2 views per clip (B, 2, C, T, H, W), got {tuple(video.shape)}")
        query_view = {k: v[:, 0] for k, v in batch.items() if k in ("video", "video_next", "flow")}
        key_view = {k: v[:, 1] for k, v in batch.items() if k in ("video", "video_next", "flow")}
        out = {}
        if self.trains("rgb"):
            out["rgb_query"] = model({"video": query_view["video"]})[self.key]  # (B, D)
        if self.trains("motion"):
            out["motion_query"] = self.motion(query_view, model.training)
        with torch.no_grad():  # the frozen stream's key encoder in eval mode (CoCLR's sampler.eval())
            self.rgb_key_encoder.train(model.training and self.trains("rgb"))
            out["rgb_key"] = self.rgb_key_encoder({"video": key_view["video"]})[self.key]
            out["motion_key"] = self.motion_key_encoder(key_view, model.training and self.trains("motion"))
        return out

    def queue_full(self) -> bool:
        return bool((self.queue_video != -1).all())

    def forward(self, embeddings: dict, batch: dict):
        phase, terms, loss = self.phase(), {}, 0.0
        keys = {s: embeddings[f"{s}_key"].detach().float() for s in STREAMS}
        queues = {"rgb": self.queue_rgb.clone(), "motion": self.queue_motion.clone()}
        B = keys["rgb"].shape[0]
        video = batch.get("video_id")
        if video is None:  # a batch built by hand: no clip shares a video with the queue
            video = torch.full((B,), UNKNOWN_VIDEO, dtype=torch.long, device=keys["rgb"].device)
        video = video.to(keys["rgb"].device)
        same_video = same_video_mask(video, self.queue_video)  # (B, K)
        drop = self.drops_own_key()  # one draw per step, as main_coclr.py; a function of (seed, step)
        for stream, other in (("rgb", "motion"), ("motion", "rgb")):
            if not self.trains(stream):
                continue
            query = embeddings[f"{stream}_query"].float()
            if phase == "init":  # stage 1: InfoNCE (CoCLR's main_nce.py), the own key the only positive
                positives = torch.zeros(B, 1 + queues[stream].shape[0], dtype=torch.bool, device=query.device)
                positives[:, 0] = True
            else:
                positives = mine_positives(keys[other], queues[other], self.o.topk, same_video, self.queue_full())
                if drop:
                    positives = drop_self(positives)
            logits = coclr_logits(query, keys[stream], queues[stream], self.o.temperature)
            terms[f"{stream}_nce"] = multi_positive_nce(logits, positives)
            loss = loss + terms[f"{stream}_nce"]
        self.__dict__["pending_keys"] = (keys["rgb"], keys["motion"], video)
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def enqueue(self, rgb: torch.Tensor, motion: torch.Tensor, video: torch.Tensor | None = None) -> None:
        """Both streams' keys and the clips' source videos of the global batch into the queues at the
        same rows (oldest replaced)."""
        if video is None:
            video = torch.full((rgb.shape[0],), UNKNOWN_VIDEO, dtype=torch.long, device=rgb.device)
        ptr = enqueue_rows([self.queue_rgb, self.queue_motion, self.queue_video], [rgb, motion, video],
                           int(self.queue_ptr))
        self.queue_ptr.fill_(ptr)

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
