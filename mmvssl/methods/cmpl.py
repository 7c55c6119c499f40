"""`cmpl`: cross-model pseudo-labelling (CMPL; Xu et al., CVPR 2022, "Cross-Model Pseudo-Labeling for
Semi-Supervised Action Recognition").

A main network (the model: what is saved) and a lightweight auxiliary network (`aux_overrides` on
the same preset: narrower and shallower; it lives in the method, trained and checkpointed, not
shipped) learn from the same clips. Per batch:

- labelled samples (data.labelled_fraction, by key): cross-entropy of both networks on the weak view;
- unlabelled samples: each network's confident prediction on the weak view (softmax probability
  >= `threshold`) is a pseudo-label for the *other* network's prediction on the strong view: the
  auxiliary network's pseudo-labels supervise the main one, the main one's the auxiliary. Neither
  network learns from its own pseudo-labels (their different biases are the point of the paper);
  below the threshold a pseudo-label contributes nothing.

Logged: `pseudo_label_share`, the share of this step's unlabelled samples whose auxiliary pseudo-label
passed the threshold (those train the main network, the one shipped), and `pseudo_label_share_aux`,
the same for the main network's pseudo-labels (they train the auxiliary one).

Reference: the paper (arXiv 2112.09690). No official code was found public (not in the code index
this project reads), so this module follows the paper's text: threshold 0.95 (its tau, FixMatch's),
both directions weighted by lambda_u.

Departures: the strong view is made on the device from the weak one (pseudo_label.py) instead of
RandAugment; one stream with `data.labelled_share` labelled instead of two loaders at 1:mu; the
auxiliary network is the main preset made smaller (the paper pairs a 3D-ResNet50 with a 3D-ResNet18).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .base import BuildContext, Method
from .pseudo_label import (build_semi, confident_pseudo_labels, labelled_cross_entropy, masked_cross_entropy,
                           weak_and_strong)


@dataclass
class CMPLOptions:
    task: str = ""  # eval/tasks/X.yaml or a task name: the classes and the label key
    pretrained: str = ""  # a model folder for the main network; empty: model.preset at random initialisation
    threshold: float = 0.95  # the paper's tau (FixMatch's)
    unlabelled_weight: float = 1.0  # lambda_u, for both directions
    # the auxiliary network: dotted preset overrides on top of model.overrides (lighter than the main one)
    aux_overrides: dict[str, Any] = field(default_factory=lambda: {"video.depth": 1, "video.width": 64,
                                                                   "video.heads": 2})
    jitter: float = 0.4
    grayscale: float = 0.2
    cutout: float = 0.5
    val_shards: str = ""
    eval_every: int = 0
    eval_clips: int = 1
    eval_crops: int = 1


def cross_pseudo_losses(main: torch.Tensor, aux: torch.Tensor, threshold: float
                        ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Unlabelled logits (N, 2, K) of each network (weak, strong) -> (loss of the main network, loss
    of the auxiliary one): each network's strong-view logits against the other's confident weak-view
    pseudo-labels (computed without gradient)."""
    with torch.no_grad():
        from_aux, aux_conf = confident_pseudo_labels(aux[:, 0].float().softmax(-1), threshold)
        from_main, main_conf = confident_pseudo_labels(main[:, 0].float().softmax(-1), threshold)
    main_loss = masked_cross_entropy(main[:, 1], from_aux, aux_conf)
    aux_loss = masked_cross_entropy(aux[:, 1], from_main, main_conf)
    # the shares of unlabelled samples whose pseudo-label passed the threshold: the auxiliary network's
    # (they train the main network, the one shipped: `pseudo_label_share`) and the main network's (they
    # train the auxiliary one: `pseudo_label_share_aux`)
    n = max(1, len(aux_conf))
    return main_loss, aux_loss, {"pseudo_label_share": aux_conf.float().sum() / n,
                                 "pseudo_label_share_aux": main_conf.float().sum() / n}


class CMPL(Method):
    name = "cmpl"
    paper = "CMPL (Xu et al., CVPR 2022): main + lightweight auxiliary network exchange confident pseudo-labels"
    Options = CMPLOptions

    def __init__(self, options: CMPLOptions, aux_net):
        super().__init__()
        self.opt = options
        self.aux_net = aux_net  # trained here, checkpointed with the run, not shipped
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        # the auxiliary network: the preset made lighter by aux_overrides, random initialisation
        return build_semi(cls, cfg, ctx, lambda options: OmegaConf.merge(
            cfg, {"model": {"overrides": dict(options.aux_overrides), "init_arch": ""}}))

    def decayed_modules(self):
        return [self.aux_net]

    def prepare(self, batch: dict) -> dict:
        return weak_and_strong(self, batch)

    def embed(self, model, batch: dict) -> dict:
        return {"main_logits": model(batch)["logits"], "aux_logits": self.aux_net(batch)["logits"]}  # (B, 2, K)

    def forward(self, embeddings: dict, batch: dict):
        labels = batch["labels"]
        main, aux = embeddings["main_logits"].float(), embeddings["aux_logits"].float()
        sup_main, sup_aux = labelled_cross_entropy(main[:, 0], labels), labelled_cross_entropy(aux[:, 0], labels)
        unlabelled = labels < 0
        un_main, un_aux, conf = cross_pseudo_losses(main[unlabelled], aux[unlabelled], self.opt.threshold)
        w = self.opt.unlabelled_weight
        loss = sup_main + sup_aux + w * (un_main + un_aux)
        return loss, {"ce_main": sup_main.detach(), "ce_aux": sup_aux.detach(), "pseudo_main": un_main.detach(),
                      "pseudo_aux": un_aux.detach(), **{k: v.detach() for k, v in conf.items()},
                      "labelled": (labels >= 0).float().sum()}

    @torch.no_grad()
    def after_step(self, model, step: int) -> None:
        self.validation(model, step)

    def log_values(self) -> dict[str, float]:
        return dict(self.validation.last)
