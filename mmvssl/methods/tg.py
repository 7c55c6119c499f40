"""`tg`: semi-supervised video recognition from RGB and its temporal gradient (TG; Xiao et al., CVPR
2022, "Learning from Temporal Gradient for Semi-supervised Action Recognition").

Two streams, each a video encoder with a classifier head: the RGB stream is the model (what is
saved), the TG stream reads the clip's temporal gradient (frame differences, mmvssl.data.motion,
computed on the device) and lives in the method (trained, checkpointed, not shipped). Per batch:

- labelled samples (data.labelled_fraction, by key): cross-entropy of both streams on the weak view;
- every unlabelled sample: FixMatch. The weak view's logits of the two streams, averaged and
  softmaxed, give a pseudo-label; where its probability reaches `threshold`, it supervises both
  streams' predictions on the strong view (pseudo_label.py); below the threshold it contributes
  nothing; the loss is divided by the number of unlabelled samples (FixMatch's normalisation);
- cross-modal alignment: the RGB stream's pooled features pulled towards the TG stream's
  (1 - cosine, TG side detached: the reference code's `align_stop_grad: tg`), on every clip.

Departures: one alignment point (the pooled feature) instead of several backbone layers; the strong
view is made on the device from the weak one (colour, greyscale, cutout; pseudo_label.py) rather
than RandAugment; labelled and unlabelled samples share one stream (`data.labelled_share` sets how
much of it is labelled) instead of two loaders at ratio 1:mu.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..data.motion import temporal_gradient
from .base import BuildContext, Method
from .pseudo_label import (build_semi, confident_pseudo_labels, labelled_cross_entropy, masked_cross_entropy,
                           weak_and_strong)


@dataclass
class TGOptions:
    task: str = ""  # eval/tasks/X.yaml or a task name: the classes and the label key
    pretrained: str = ""  # a model folder for the RGB stream; empty: model.preset at random initialisation
    threshold: float = 0.95  # FixMatch's confidence threshold
    unlabelled_weight: float = 1.0  # lambda_u
    align_weight: float = 1.0  # cross-modal feature alignment (RGB towards stop-grad TG)
    jitter: float = 0.4  # strong view: colour jitter strength
    grayscale: float = 0.2
    cutout: float = 0.5  # side of the cutout square, share of the frame
    val_shards: str = ""
    eval_every: int = 0
    eval_clips: int = 1
    eval_crops: int = 1


class TG(Method):
    name = "tg"
    paper = "TG (Xiao et al., CVPR 2022): RGB + temporal-gradient streams, FixMatch pseudo-labels, feature alignment"
    Options = TGOptions

    def __init__(self, options: TGOptions, tg_net):
        super().__init__()
        self.opt = options
        self.tg_net = tg_net  # the temporal-gradient stream: trained here, checkpointed, not shipped
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        return build_semi(cls, cfg, ctx, lambda options: cfg)  # the TG stream: model.preset, random initialisation

    def decayed_modules(self):
        return [self.tg_net]

    def prepare(self, batch: dict) -> dict:
        return weak_and_strong(self, batch)

    def embed(self, model, batch: dict) -> dict:
        rgb = model(batch)  # logits (B, 2, K), pooled (B, 2, width): weak, strong
        tg = self.tg_net({"video": temporal_gradient(batch["video"])})
        return {"rgb_logits": rgb["logits"], "rgb_pooled": rgb["pooled"],
                "tg_logits": tg["logits"], "tg_pooled": tg["pooled"]}

    def forward(self, embeddings: dict, batch: dict):
        labels = batch["labels"]  # (B,)
        rgb, tg = embeddings["rgb_logits"].float(), embeddings["tg_logits"].float()  # (B, 2, K)
        supervised = labelled_cross_entropy(rgb[:, 0], labels) + labelled_cross_entropy(tg[:, 0], labels)
        unlabelled = labels < 0
        with torch.no_grad():
            probs = ((rgb[unlabelled, 0] + tg[unlabelled, 0]) / 2).softmax(dim=-1)  # the reference's 'avg'
            pseudo, confident = confident_pseudo_labels(probs, self.opt.threshold)
        pseudo_loss = (masked_cross_entropy(rgb[unlabelled, 1], pseudo, confident)
                       + masked_cross_entropy(tg[unlabelled, 1], pseudo, confident))
        align = (1 - F.cosine_similarity(embeddings["rgb_pooled"][:, 0].float(),
                                         embeddings["tg_pooled"][:, 0].float().detach(), dim=-1)).mean()
        loss = supervised + self.opt.unlabelled_weight * pseudo_loss + self.opt.align_weight * align
        n_unl = max(1, int(unlabelled.sum()))
        return loss, {"ce_labelled": supervised.detach(), "ce_pseudo": pseudo_loss.detach(), "align": align.detach(),
                      "confident": torch.tensor(float(confident.sum()) / n_unl, device=loss.device),
                      "labelled": (labels >= 0).float().sum()}

    @torch.no_grad()
    def after_step(self, model, step: int) -> None:
        self.validation(model, step)

    def log_values(self) -> dict[str, float]:
        return dict(self.validation.last)
