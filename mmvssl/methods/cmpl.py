"""`cmpl`: cross-model pseudo-labelling (CMPL; Xu et al., CVPR 2022, "Cross-Model Pseudo-Labeling
for Semi-Supervised Action Recognition").

A main network (the model: what is saved) and a lightweight auxiliary network of another structure
learn from the same clips. The paper's premise is that the two networks' different structural
biases make them learn complementary representations (its pair: a 3D-ResNet50 main network and a
3D-ResNet18 auxiliary one "of lower channel capacity"). mmvssl's main video encoder is a
transformer; the auxiliary network is a 3-D CNN built from torchvision's video ResNet blocks
(`AuxVideoCNN`: r3d_18 / mc3_18 / r2plus1d_18 with `method.options.aux.layers` blocks per stage and
`aux.widths` channels, random initialisation, nothing downloaded). It lives in the method: trained,
checkpointed in `method.safetensors`, not shipped. Per batch:

- labelled samples (data.labelled_fraction, by key): cross-entropy of both networks on the weak view;
- unlabelled samples: each network's confident prediction on the weak view (softmax probability
  >= `threshold`) is a pseudo-label for the *other* network's prediction on the strong view: the
  auxiliary network's pseudo-labels supervise the main one, the main one's the auxiliary. Neither
  network learns from its own pseudo-labels (the paper's Eq. 6); below the threshold a pseudo-label
  contributes nothing. loss = CE_main + CE_aux + unlabelled_weight * (U_main + U_aux).

Logged: `pseudo_label_share`, the share of this step's unlabelled samples whose auxiliary pseudo-label
passed the threshold (those train the main network, the one shipped), and `pseudo_label_share_aux`,
the same for the main network's pseudo-labels (they train the auxiliary one).

Reference: the paper (arXiv 2112.09690) and its project page (justimyhxu.github.io/projects/cmpl).
No official code is public: the project page links the paper only, Papers-with-Code lists no
implementation, and the code index this project reads holds none. The hyper-parameters are
therefore the paper's FixMatch ones as this module reads them: threshold 0.95 (tau), one weight
lambda_u for both directions, weak view = random crop and flip, strong view = a colour / cutout
augmentation.

Departures (docs/methods.md): the strong view is made on the device from the weak one
(pseudo_label.py) instead of RandAugment; one stream with `data.labelled_share` labelled instead of
two loaders at 1:mu; the main network is a video transformer (not a 3D-ResNet50) and the auxiliary
CNN is narrower than a 3D-ResNet18 (demo size: 1 block per stage, widths 8-64) to train on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn
from torchvision.models.video import resnet as video_resnet

from ..errors import ConfigError
from .base import BuildContext, Method
from .pseudo_label import (build_semi, confident_pseudo_labels, labelled_cross_entropy, masked_cross_entropy,
                           weak_and_strong)


@dataclass
class AuxOptions:
    """The auxiliary 3-D CNN: torchvision's video ResNet blocks (BasicBlock with the arch's convolutions)."""
    arch: str = "r3d_18"  # r3d_18 (3x3x3 convolutions), mc3_18 (3-D in the first stage, 2-D after), r2plus1d_18
    layers: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # blocks per stage (torchvision's: 2, 2, 2, 2)
    widths: list[int] = field(default_factory=lambda: [8, 16, 32, 64])  # channels per stage (torchvision's: 64 .. 512)


@dataclass
class CMPLOptions:
    task: str = ""  # eval/tasks/X.yaml or a task name: the classes and the label key
    pretrained: str = ""  # a model folder for the main network; empty: model.preset at random initialisation
    threshold: float = 0.95  # the paper's tau (FixMatch's)
    unlabelled_weight: float = 1.0  # lambda_u, for both directions
    aux: AuxOptions = field(default_factory=AuxOptions)  # the auxiliary network (structurally unlike the main one)
    jitter: float = 0.4
    grayscale: float = 0.2
    cutout: float = 0.5
    val_shards: str = ""
    eval_every: int = 0
    eval_clips: int = 1
    eval_crops: int = 1


# torchvision's video ResNets (torchvision/models/video/resnet.py): per arch the stem kind and each
# stage's convolution builder
AUX_ARCHS = {
    "r3d_18": ("3d", [video_resnet.Conv3DSimple] * 4),
    "mc3_18": ("3d", [video_resnet.Conv3DSimple] + [video_resnet.Conv3DNoTemporal] * 3),
    "r2plus1d_18": ("2plus1d", [video_resnet.Conv2Plus1D] * 4),
}


class AuxVideoCNN(nn.Module):
    """A video ResNet classifier with chosen depth and widths: forward(batch) -> {"logits": (B, [V,] K),
    "pooled": (B, [V,] width)} from batch["video"] (B, [V,] 3, T, H, W), like VideoClassifier.

    Its blocks are torchvision's (BasicBlock with Conv3DSimple / Conv3DNoTemporal / Conv2Plus1D), and
    the stem, the downsampling shortcuts and the initialisation follow torchvision's VideoResNet;
    they are assembled here because VideoResNet fixes the widths at 64-512 (an R3D-18 is ~33M
    parameters, too heavy beside the demo's transformer on a CPU). `layers` 2, 2, 2, 2 with `widths`
    64, 128, 256, 512 is torchvision's network exactly."""

    def __init__(self, num_classes: int, arch: str = "r3d_18", layers=(1, 1, 1, 1), widths=(8, 16, 32, 64)):
        super().__init__()
        if arch not in AUX_ARCHS:
            raise ConfigError(f"method.options.aux.arch: '{arch}' is not one of {', '.join(AUX_ARCHS)} (method 'cmpl')")
        layers, widths = list(layers), list(widths)
        if not 1 <= len(layers) <= 4 or len(widths) != len(layers) or min(layers) < 1 or min(widths) < 1:
            raise ConfigError(f"method.options.aux: layers {layers} and widths {widths} must be 1 to 4 positive "
                              f"integers each, one per stage (method 'cmpl')")
        stem_kind, makers = AUX_ARCHS[arch]
        self.arch, self.width = arch, widths[-1]
        w0 = widths[0]
        if stem_kind == "3d":  # torchvision's BasicStem with w0 channels
            self.stem = nn.Sequential(nn.Conv3d(3, w0, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
                                      nn.BatchNorm3d(w0), nn.ReLU(inplace=True))
        else:  # R2Plus1dStem: 45 middle channels for 64, scaled with w0
            mid = max(1, round(45 * w0 / 64))
            self.stem = nn.Sequential(nn.Conv3d(3, mid, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
                                      nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
                                      nn.Conv3d(mid, w0, (3, 1, 1), 1, (1, 0, 0), bias=False),
                                      nn.BatchNorm3d(w0), nn.ReLU(inplace=True))
        stages, inplanes = [], w0
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stride, maker = (1 if i == 0 else 2), makers[i]
            shortcut = None
            if stride != 1 or inplanes != width:  # VideoResNet._make_layer's projection shortcut
                shortcut = nn.Sequential(nn.Conv3d(inplanes, width, 1, stride=maker.get_downsample_stride(stride),
                                                   bias=False), nn.BatchNorm3d(width))
            stage = [video_resnet.BasicBlock(inplanes, width, maker, stride, shortcut)]
            stage += [video_resnet.BasicBlock(width, width, maker) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(self.width, num_classes)
        for m in self.modules():  # VideoResNet's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)  # uniform predictions at the start, as the main VideoClassifier's head
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        video = batch["video"]
        views = video.shape[:2] if video.ndim == 6 else None
        x = video.flatten(0, 1) if views else video  # (N, 3, T, H, W)
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"cmpl's auxiliary {self.arch} expects clips (B, [V,] 3, T, H, W), got {tuple(video.shape)}")
        pooled = self.stages(self.stem(x)).mean(dim=(2, 3, 4))  # (N, width): global average pool
        logits = self.head(pooled)  # (N, K)
        if views:
            pooled, logits = pooled.view(*views, -1), logits.view(*views, -1)
        return {"logits": logits, "pooled": pooled}


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
        # the auxiliary network: a 3-D CNN (a structure unlike the main transformer's), random initialisation
        return build_semi(cls, cfg, ctx, second_network=lambda options, task: AuxVideoCNN(
            len(task.classes), options.aux.arch, options.aux.layers, options.aux.widths))

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
