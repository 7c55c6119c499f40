"""`narrator`: LaViLa's narrator (Zhao et al. 2023): a video encoder, an attention pooler and GPT-2
with gated cross-attention, trained with the captioning cross-entropy of each clip's narration
(facebookresearch/LaViLa @ 8002b5a lavila/models/models.py `VCLM_*`, lavila/models/gpt2_gated.py,
lavila/models/narrator.py).

The model computes its own loss (`caption_loss`, from the `narration` targets this method
tokenizes once per batch); the objective is the single term that weights and logs it. The
`narrator:` section of the config describes the model (mmvssl/narrator/options.py). A frozen
language model or visual encoder must come with trained weights (a GPT-2 folder, a trained model
folder): a config that freezes random parts cannot learn and is refused before training.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..errors import ConfigError
from ..losses.objective import Objective
from .base import BuildContext, Method
from .contrastive import sampling_of


def check_frozen_parts_are_pretrained(ncfg) -> None:
    """A frozen part must bring trained weights: a frozen GPT-2 of a size name, or a frozen visual
    encoder of a preset name, is random and stays so (only the pooler and gates could learn). One
    line naming each such part otherwise."""
    missing = []
    if ncfg.freeze_lm and not Path(ncfg.lm).is_dir():
        missing.append(f"narrator.lm '{ncfg.lm}' is a GPT-2 size with random weights (give a folder with GPT-2 "
                       f"weights, or set narrator.freeze_lm=false)")
    if ncfg.freeze_visual and not (Path(ncfg.visual) / "config.json").is_file():
        missing.append(f"narrator.visual '{ncfg.visual}' is a preset with random weights (give a trained model "
                       f"folder, e.g. a dual encoder's, or set narrator.freeze_visual=false)")
    if missing:
        raise ConfigError("method 'narrator' cannot learn: frozen parts have no pretrained weights: "
                          + "; ".join(missing))


class Narrator(Method):
    name = "narrator"
    paper = "LaViLa narrator (Zhao et al. 2023)"

    def __init__(self, tokenizer, max_length: int):
        super().__init__()
        self.objective = Objective([{"name": "caption_ce", "loss": "model", "inputs": ["caption_loss"]}])
        self.__dict__["tokenizer"] = tokenizer  # a sentencepiece processor, not a module
        self.max_length = max_length

    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext):
        from ..narrator.build import build_narrator, resolve_tokenizer
        from ..narrator.tokenizer import SentencePieceTokenizer
        cls.options(cfg)
        check_frozen_parts_are_pretrained(cfg.narrator)
        if cfg.train.accum_steps > 1:
            raise ConfigError("train.accum_steps > 1 is for contrastive objectives; the narrator's "
                              "cross-entropy accumulates like any loss: raise data.batch_size instead")
        with ctx.accelerator.main_process_first():  # the main process fits the tokenizer, the others read it
            tokenizer_file = resolve_tokenizer(cfg.narrator, cfg.data.shards, ctx.out)
        tokenizer = SentencePieceTokenizer(tokenizer_file)
        net = build_narrator(cfg.narrator, tokenizer)
        net.config["sampling"] = sampling_of(cfg)
        net.tokenizer_file = str(tokenizer_file)
        return net, cls(tokenizer, cfg.narrator.max_length)

    def prepare(self, batch: dict) -> dict:
        from ..narrator.build import narration_targets
        narration, has = narration_targets(batch, self.tokenizer, self.max_length)
        device = batch["video"].device
        batch["narration"], batch["has_narration"] = narration.to(device), has.to(device)
        return batch

    def forward(self, embeddings: dict, batch: dict):
        return self.objective(embeddings, batch)
