"""The `narrator:` section of an experiment config (schema only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class NarratorConfig:
    visual: str = "vatt-tiny"  # a saved mmvssl model folder (its video encoder and weights) or a preset name
    visual_overrides: Optional[dict[str, Any]] = None  # dotted keys on a preset, e.g. video.patch; null: none
    lm: str = "tiny"  # a size in LM_SIZES, or a local folder holding GPT-2 weights (config.json + weights)
    tokenizer: str = ""  # a sentencepiece .model; "" fits one on data.shards' captions and narrations
    vocab_size: int = 1000
    num_queries: int = 256
    cross_every: int = 1  # gated cross-attention before every k-th GPT-2 block
    freeze_lm: bool = False
    freeze_visual: bool = True
    max_length: int = 32  # narration tokens, bos and eos included
