"""`simclr`: two views of each clip embedded by the same network and contrasted with NT-Xent.

One module, two papers, told apart by their configs (configs/methods/):
- SimCLR (Chen et al. 2020) applied to video: two augmentations of the same window
  (`data.sampler: same`, `data.num_clips: 2`: the window is decoded once), an MLP projection head,
  SimCLR's augmentations (configs/methods/simclr.yaml, after google-research/simclr data_util.py:
  crop area 0.08-1, aspect 3/4-4/3, colour jitter, greyscale, blur with p 0.5) and its NT-Xent
  (objective.py `add_contrastive_loss`: each view against the other view's and its own side's other
  clips, the two directions summed there and averaged here, a factor 2 of scale).
- CVRL (Qian et al. 2021): two clips of one video at a gap drawn from a linearly decreasing
  distribution (`data.sampler: cvrl`), temporally consistent strong augmentation (`data.augment`:
  crop, flip, jitter, greyscale; blur with p 1.0 on the first clip and 0.1 on the second,
  `blur_per_view`; solarisation with p 0.2 on the second, `solarize_per_view`), a 4-layer MLP head
  (three hidden Linear-BN-ReLU, then Linear(128): `heads.layers: 4`), InfoNCE at temperature 0.1
  with its two directions summed (`method.options.reduction: sum`), as configs/methods/cvrl.yaml.

The model returns `video_<space>` (B, V, D), normalised, for V >= 2 views; every pair of views
(v, w) with v < w is one NT-Xent term (averaged), so SimCLR's two views give exactly NT-Xent.
Negatives are gathered across processes (losses/contrastive.py).

References (docs/methods.md lists what still differs, with reasons):
- SimCLR: google-research/simclr, data_util.py (`preprocess_for_train`, `batch_random_blur`),
  objective.py `add_contrastive_loss` (loss_a + loss_b: twice mmvssl's value,
  tests/test_methods_mechanisms.py), model_util.py `projection_head` (Linear-BN-ReLU, then a
  Linear-BN output layer without bias).
- CVRL: tensorflow/models official/projects/video_ssl: ops/video_ssl_preprocess_ops.py
  `sample_ssl_sequence` (the gap's CDF 2k/m - k^2/m^2, earlier start uniform, order shuffled: the
  `cvrl` sampler, tests/test_methods_mechanisms.py) and `random_color_jitter_3d` / `random_blur` /
  `random_solarization` (p=0.2; x >= 0.5 -> 1 - x), `random_blur` (kernel height // 10, sigma U(0.1, 2)),
  dataloaders/video_ssl_input.py `_process_image` (crop area 0.3-1, aspect 0.5-2; jitter, then
  `random_blur(image_1, ..., 1.0)`, `random_blur(image_2, ..., 0.1)`, `random_solarization(image_2)`),
  losses/losses.py `contrastive_loss` (`loss = loss_a + loss_b`, as SimCLR's: reduction "sum"),
  modeling/video_ssl_model.py `VideoSSLModel` (`hidden_layer_num` x Dense-BN-activation, then
  Dense(projection_dim)) with configs/video_ssl.py `VideoSSLModel` (hidden_dim 2048, hidden_layer_num 3,
  projection_dim 128) and `SSLLosses` (temperature 0.1). configs/methods/cvrl.yaml follows each of these
  (the head's hidden width is the preset's, 512 in video-tiny).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from omegaconf import DictConfig

from ..errors import ConfigError
from ..losses.contrastive import nt_xent_loss
from .base import BuildContext, Method
from .contrastive import build_student


@dataclass
class SimCLROptions:
    temperature: float = 0.1  # SimCLR's best at batch 4096 is 0.1 (table 5); CVRL uses 0.1
    reduction: str = "mean"  # of NT-Xent's two directions: mean, or sum (CVRL's losses.py loss_a + loss_b)
    space: str = "ssl"  # the embedding `video_<space>` (a projection head's output)


class SimCLR(Method):
    name = "simclr"
    paper = "SimCLR (Chen et al. 2020) on video; CVRL (Qian et al. 2021) with its sampler and augmentation"
    Options = SimCLROptions

    def __init__(self, options: SimCLROptions):
        super().__init__()
        if options.reduction not in ("mean", "sum"):
            raise ConfigError(f"method '{self.name}': method.options.reduction must be 'mean' or 'sum', "
                              f"got '{options.reduction}'")
        self.temperature, self.key, self.reduction = options.temperature, f"video_{options.space}", options.reduction
        self.modalities = {"video"}

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        options = cls.options(cfg)
        if not ctx.spec.multi_view:
            raise ConfigError(f"method '{cls.name}' contrasts views: data.sampler '{ctx.spec.sampler}' gives one "
                              f"(use same with data.num_clips=2, or cvrl)")
        return build_student(cfg, ctx.accelerator), cls(options)

    def forward(self, embeddings: dict, batch: dict):
        if self.key not in embeddings:
            raise ConfigError(f"method '{self.name}' reads '{self.key}', but the model gives only: "
                              f"{', '.join(sorted(embeddings))} (method.options.space)")
        views = embeddings[self.key].float()  # (B, V, D), normalised
        pairs = list(combinations(range(views.shape[1]), 2))
        loss = sum(nt_xent_loss(views[:, v], views[:, w], self.temperature, reduction=self.reduction)
                   for v, w in pairs) / len(pairs)
        return loss, {"nt_xent": loss.detach()}
