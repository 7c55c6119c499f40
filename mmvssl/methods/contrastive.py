"""`contrastive`: the multimodal contrastive recipe of VATT (Akbari et al. 2021), MMV (Alayrac
et al. 2020) and LaViLa's dual encoder (Zhao et al. 2023), with iBoot-style image-teacher
distillation (the `teacher:` section) beside it.

The model is a MultimodalModel from `model.preset`; the loss is the Objective of
`objective.terms` (NCE, MIL-NCE, NT-Xent, SigLIP, SSL-CLIP, distillation terms), which decides
everything that distinguishes VATT from MMV from LaViLa: which embeddings meet, with which loss and
temperature. LaViLa's dual encoder (configs/lavila/dual_encoder.yaml) trains with `ssl_clip`,
LaViLa's SSLCLIPLoss as facebookresearch/LaViLa @ 8002b5a lavila/models/loss.py (its pseudo
temperature a parameter of the objective, in this method's state), checked against the official
numbers in tests/parity/lavila.py. A `teacher:` section adds a frozen open_clip image model whose per-frame features
(`teacher_frames`) the distillation terms read: computed on the device once per batch, or read
from the shards when `teacher.cached`. With `method.options.teacher_view` and a two-view sampler
the teacher sees its own augmentation of the clip (iBoot, configs/methods/iboot.yaml).

References (docs/methods.md lists what still differs, with reasons):
- VATT: google-research/google-research vatt/ (read at 2f6c4f7 and later): utils/train/objectives.py
  `AsymmetricNCE` (the loss its configs/multimodal.py TxFACModel and MMVFACModel name; mmvssl's
  `mil_nce` computes it with the positive once in the denominator, tests/test_methods_mechanisms.py),
  configs/loss.py (temperature, weights), modeling/heads/bridge.py `FACHead`.
- MMV: google-deepmind/deepmind-research mmv/ @ c146166: models/mm_embeddings.py
  `AudioTextVideoEmbedding` (`fac_relu`: video -> va an MLP with BN after, ReLU, va -> vat a linear layer
  with BN after; audio -> va and text -> vat linear) and config.py (512 / 256 dims), which
  mmvssl/models/heads.py `FACHeads` follow (tests/test_methods_mechanisms.py). The release holds the
  model and the UCF101 evaluation, not the training loss: the loss is VATT's MMV-FAC baseline's.
- iBoot (Saxena et al. 2022): no official code found public (searched the code index by the paper's
  title and by "iboot" repository names; only unrelated iBOT / boot-loader repositories), so the
  paper's text is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ..config import to_dict
from ..errors import ConfigError
from ..losses.objective import Objective
from ..models.multimodal import MultimodalModel
from ..models.presets import apply_overrides, load_preset
from .base import BuildContext, Method


def sampling_of(cfg: DictConfig) -> dict:
    """The clip sampling a model was trained with; it travels in config.json, for evaluation."""
    return {"num_frames": cfg.data.num_frames, "fps": cfg.data.fps, "size": cfg.data.size,
            "audio_rate": cfg.data.audio_rate}


def build_student(cfg: DictConfig, accelerator=None) -> MultimodalModel:
    """The MultimodalModel of `model.preset` + `model.overrides`, CLIP-initialised when
    `model.init_arch` is set."""
    preset = apply_overrides(load_preset(cfg.model.preset), to_dict(cfg.model.overrides))
    preset["sampling"] = sampling_of(cfg)
    net = MultimodalModel(preset)
    if cfg.model.init_arch:
        from ..models.clip_init import init_from_clip
        towers = list(cfg.model.init_towers)
        init_from_clip(net, cfg.model.init_arch, cfg.model.init_pretrained, towers)
        if accelerator is not None:
            accelerator.print(f"{' and '.join(towers)} tower(s) initialised from {cfg.model.init_arch} "
                              f"({cfg.model.init_pretrained or 'random'})")
    if cfg.model.init_from:  # a trained folder of the same architecture, or an imported model (its own)
        from ..models.imported.init_from import init_from_folder
        net = init_from_folder(net, cfg.model.init_from, preset["sampling"], to_dict(cfg.model.overrides),
                               cfg.model.init_arch)
    return net


def build_objective(cfg: DictConfig, feature_dims: dict[str, int] | None = None) -> Objective:
    o = cfg.objective
    return Objective(to_dict(o.terms), temperature=o.temperature, learnable_temperature=o.learnable_temperature,
                     min_temperature=o.min_temperature, max_temperature=o.max_temperature, feature_dims=feature_dims)


def online_teacher(cfg: DictConfig, device):
    """The frozen image teacher of the `teacher:` section, or None when teacher.arch is empty or
    its features are cached in the shards."""
    t = cfg.teacher
    if not t.arch or t.cached:
        return None
    from ..teacher.model import load_teacher
    return load_teacher(t.arch, t.pretrained, image_size=t.image_size, patch_tokens=t.patch_tokens,
                        device=device, precision=t.precision)


def cached_teacher(cfg: DictConfig, spec) -> dict | None:
    """teacher.cached: the fingerprint of the config's teacher, checked against the features reports
    of every shard folder (ConfigError naming the folder otherwise); None when not cached."""
    t = cfg.teacher
    if not t.cached:
        return None
    from ..data.shardio import parse_sources
    from ..teacher.cache import check_feature_folders
    from ..teacher.model import teacher_identity
    if not t.arch:
        raise ConfigError("teacher.cached needs teacher.arch and teacher.pretrained: the teacher whose features "
                          "`mmvssl shards add-features` cached")
    if t.patch_tokens:
        raise ConfigError("teacher.patch_tokens: cached features hold pooled frame embeddings only; "
                          "set teacher.cached=false to get patch tokens")
    if spec.multi_view:
        raise ConfigError(f"teacher.cached: data.sampler '{spec.sampler}' gives several views; teacher features "
                          f"(cached or online) pair with one clip")
    identity = teacher_identity(t.arch, t.pretrained, t.image_size)
    urls = [url for s in parse_sources(cfg.data.shards) for url in s.urls]
    identity["embed_dim"] = check_feature_folders(urls, identity)
    return identity


@dataclass
class ContrastiveOptions:
    # With several views per clip (data.sampler same or cvrl), the student embeds view 0 and the image
    # teacher sees view `teacher_view`: iBoot's teacher with its own augmentation of the clip. None:
    # one view, seen by both.
    teacher_view: int | None = None


class Contrastive(Method):
    name = "contrastive"
    paper = "VATT (Akbari et al. 2021), MMV (Alayrac et al. 2020), LaViLa dual encoder (Zhao et al. 2023), iBoot"
    Options = ContrastiveOptions

    def __init__(self, objective: Objective, teacher=None, teacher_view: int | None = None):
        super().__init__()
        self.objective = objective
        self.teacher_view = teacher_view
        # frozen and reloaded from its tag each run: kept out of the module tree, so it is neither
        # optimised nor checkpointed
        self.__dict__["teacher"] = teacher
        self.modalities = objective.modalities

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        spec = ctx.spec
        if options.teacher_view is not None:
            views = spec.num_clips if spec.sampler in ("same", "uniform") else 2 if spec.sampler == "cvrl" else 1
            if not cfg.teacher.arch or cfg.teacher.cached or not spec.multi_view or not 0 < options.teacher_view < views:
                raise ConfigError(f"method.options.teacher_view={options.teacher_view}: needs an online teacher "
                                  f"(teacher.arch, not cached) and data.sampler same or cvrl with more views "
                                  f"than that index (got sampler '{spec.sampler}', {views} view(s))")
        elif spec.multi_view:
            raise ConfigError(f"method 'contrastive' embeds one clip: data.sampler '{spec.sampler}' gives several "
                              f"views (set method.options.teacher_view to give the image teacher one of them)")
        teacher = online_teacher(cfg, ctx.accelerator.device)
        ctx.spec.teacher_features = cached_teacher(cfg, ctx.spec)  # the loader pairs cached features with frames
        teacher_dim = teacher.embed_dim if teacher is not None else (ctx.spec.teacher_features or {}).get("embed_dim")
        net = build_student(cfg, ctx.accelerator)
        feature_dims = net.output_dims()
        if teacher_dim:
            feature_dims["teacher_frames"] = teacher_dim
        terms = to_dict(cfg.objective.terms)
        net.frame_features = any("video_frames" in (term.get("inputs") or ()) for term in terms)
        return net, cls(build_objective(cfg, feature_dims), teacher, options.teacher_view)

    def prepare(self, batch: dict) -> dict:
        if self.teacher_view is not None and "video" in batch:  # (B, V, C, T, H, W)
            batch.update(self.teacher(batch["video"][:, self.teacher_view]))  # teacher_frames of its own view
            batch["video"] = batch["video"][:, 0]  # (B, C, T, H, W): the student's view
        elif self.teacher is not None and "video" in batch:
            batch.update(self.teacher(batch["video"]))  # teacher_frames (B, T, D), no gradient
        # (teacher.cached: the loader already put the cached teacher_frames (B, T, D) in the batch)
        return batch

    def forward(self, embeddings: dict, batch: dict):
        return self.objective(embeddings, batch)

    def log_values(self) -> dict[str, float]:
        return self.objective.temperatures()
