"""Build a narrator from config: visual encoder, GPT-2 (a named size or a local folder), tokenizer;
and turn loader batches into (clip, narration) training pairs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..models.presets import apply_overrides, load_preset
from .model import Narrator
from .tokenizer import SentencePieceTokenizer, texts_from_shards, train_sentencepiece

# GPT-2 shapes by name (weights come only from a local folder; nothing is downloaded)
LM_SIZES = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4),
    "small": dict(n_layer=4, n_embd=256, n_head=4),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}


def resolve_tokenizer(ncfg, shards: str, output_dir: str | Path) -> Path:
    """The sentencepiece model to use: the configured one, or one fitted now on the shards."""
    if ncfg.tokenizer:
        path = Path(ncfg.tokenizer)
        if not path.is_file():
            raise ConfigError(f"narrator.tokenizer: file not found: {path}")
        return path
    return train_sentencepiece(texts_from_shards(shards), Path(output_dir) / "tokenizer.model", ncfg.vocab_size)


def build_narrator(ncfg, tokenizer: SentencePieceTokenizer) -> Narrator:
    visual_path = Path(ncfg.visual)
    visual_state = None
    if (visual_path / "config.json").is_file():  # a trained dual encoder: start from its video tower
        from safetensors.torch import load_file
        source = json.loads((visual_path / "config.json").read_text())
        visual_state = {k[len("encoders.video."):]: v for k, v in load_file(str(visual_path / "model.safetensors")).items()
                        if k.startswith("encoders.video.")}
    else:
        source = load_preset(ncfg.visual)
    overrides = getattr(ncfg, "visual_overrides", None) or {}
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides)
    if overrides:
        if visual_state is not None:
            raise ConfigError(f"narrator.visual_overrides: '{ncfg.visual}' is a trained model whose weights fix its "
                              f"shape; overrides apply to a preset name or file")
        bad = [k for k in overrides if k != "video" and not k.startswith("video.")]
        if bad:
            raise ConfigError(f"narrator.visual_overrides: keys must start with 'video.' (the narrator keeps only "
                              f"the video encoder), got {', '.join(bad)}")
        source = apply_overrides(source, overrides)
    if "backbone" in source or "video" not in source:
        raise ConfigError(f"narrator.visual: '{ncfg.visual}' has no video encoder of its own (a modality-agnostic "
                          f"model shares one backbone); use a modality-specific model or preset")
    video_cfg = source["video"]
    lm_state = None
    if Path(ncfg.lm).is_dir():
        from transformers import GPT2LMHeadModel
        pretrained = GPT2LMHeadModel.from_pretrained(ncfg.lm, local_files_only=True)
        lm_cfg = pretrained.config.to_dict()
        lm_state = pretrained.state_dict()
        if lm_cfg["vocab_size"] != tokenizer.vocab_size:
            raise ConfigError(f"narrator.lm: {ncfg.lm} has a vocabulary of {lm_cfg['vocab_size']} tokens, "
                              f"the tokenizer {tokenizer.vocab_size}; use the tokenizer saved with it")
    elif ncfg.lm in LM_SIZES:
        from transformers import GPT2Config
        lm_cfg = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=max(64, ncfg.max_length),
                            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **LM_SIZES[ncfg.lm]).to_dict()
    else:
        raise ConfigError(f"narrator.lm: '{ncfg.lm}' is neither a local folder nor a size ({', '.join(LM_SIZES)})")
    model = Narrator({"video": video_cfg, "lm": lm_cfg, "num_queries": ncfg.num_queries,
                      "cross_every": ncfg.cross_every, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id,
                      "eos_id": tokenizer.eos_id, "freeze_lm": ncfg.freeze_lm, "freeze_visual": ncfg.freeze_visual})
    if visual_state is not None:
        model.visual.load_state_dict(visual_state)
    if lm_state is not None:
        inner = model.lm.state_dict()
        for key in inner:  # GatedBlock wraps block i as h.i.block
            plain = key.replace(".block.", ".", 1)
            if ".gated." not in key and plain in lm_state:
                inner[key] = lm_state[plain]
        model.lm.load_state_dict(inner)
    return model


def narration_for_window(meta: dict) -> str:
    """The narration overlapping the clip's window most (LaViLa's clip-narration pairs); the caption
    when the video has no timed narrations."""
    start, end = meta.get("window", (0.0, float("inf")))
    best, best_overlap = None, 0.0
    for n in meta.get("narrations") or []:
        overlap = min(end, float(n["end"])) - max(start, float(n["start"]))
        if overlap > best_overlap and str(n.get("text", "")).strip():
            best, best_overlap = n["text"], overlap
    return best or meta.get("caption") or ""


def narration_targets(batch: dict, tokenizer: SentencePieceTokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, max_length) of each clip's narration, and a mask of the clips that have one."""
    texts = [narration_for_window(m) for m in batch["meta"]]
    return tokenizer.encode(texts, max_length), torch.tensor([bool(t) for t in texts])
