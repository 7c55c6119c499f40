"""LaViLa-style narrator: a video encoder, an attention pooler, and GPT-2 with gated cross-attention.

Every k-th GPT-2 block gets, before its self-attention, a gated cross-attention layer over the
pooled visual tokens and a gated feed-forward layer (Flamingo). Each gate is tanh(alpha) with
alpha = 0 at initialisation, so the untrained narrator is exactly the language model.
GPT-2 comes from transformers (a config, or a local folder with weights); nothing is downloaded.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..fsio import atomic_folder
from ..models.builders import build_encoders
from ..models.safeload import check_config_fits_weights


class AttentionPooler(nn.Module):
    """N learnable queries attend once over the visual tokens (layer-normed queries and context)."""

    def __init__(self, width: int, context_width: int, num_queries: int = 256, heads: int = 8):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        # standardise each visual feature over clips and tokens: a frozen encoder's tokens share a
        # large common component (clip-to-clip differences are a few percent of their variance),
        # which would otherwise drown the signal the text should attend to
        self.standardize = nn.BatchNorm1d(context_width, affine=False)
        self.ln_q = nn.LayerNorm(width)
        self.ln_k = nn.LayerNorm(context_width)
        self.attn = nn.MultiheadAttention(width, heads, kdim=context_width, vdim=context_width, batch_first=True)
        self.ln_out = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) visual tokens -> (B, num_queries, width)."""
        q = self.ln_q(self.queries).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        ctx = self.ln_k(self.standardize(tokens.transpose(1, 2)).transpose(1, 2))  # BN over (B, N) per feature
        out, _ = self.attn(q, ctx, ctx, need_weights=False)
        return self.ln_out(out)


class GatedCrossAttention(nn.Module):
    """x + tanh(a1) * xattn(ln(x), visual); then x + tanh(a2) * ffn(ln(x)). Gates start closed."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ln_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, int(width * mlp_ratio)), nn.GELU(), nn.Linear(int(width * mlp_ratio), width))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, visual: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, L, D); visual: the context (B', Q, D), or its keys and values from visual_kv (cached
        once per clip for generation). B is a multiple of B': consecutive rows share a clip."""
        clips = visual[0].shape[0] if isinstance(visual, tuple) else visual.shape[0]
        if x.shape[0] % clips:
            raise ValueError(f"gated cross-attention: {x.shape[0]} text rows for {clips} clips' visual context "
                             f"(each clip's rows must be a whole number)")
        if isinstance(visual, tuple):
            attended = self._attend_cached(self.ln_attn(x), *visual)
        else:
            if visual.shape[0] != x.shape[0]:  # beams / candidates share a clip's context
                visual = visual.repeat_interleave(x.shape[0] // visual.shape[0], dim=0)
            attended, _ = self.attn(self.ln_attn(x), visual, visual, need_weights=False)
        x = x + torch.tanh(self.attn_gate) * attended
        return x + torch.tanh(self.ffn_gate) * self.ffn(self.ln_ffn(x))

    def visual_kv(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', Q, D) visual context -> its projected keys and values, (B', heads, Q, D / heads) each.
        They never change while a clip's text grows, so generation computes them once per clip
        instead of once per token and layer (nn.MultiheadAttention has no such cache: hence here)."""
        D, h = self.attn.embed_dim, self.attn.num_heads
        w_k, w_v = self.attn.in_proj_weight[D:].chunk(2)
        b_k, b_v = self.attn.in_proj_bias[D:].chunk(2)
        B, Q, _ = visual.shape
        k = F.linear(visual, w_k, b_k).view(B, Q, h, D // h).transpose(1, 2)  # (B', h, Q, hd)
        v = F.linear(visual, w_v, b_v).view(B, Q, h, D // h).transpose(1, 2)
        return k, v

    def _attend_cached(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """nn.MultiheadAttention's arithmetic (query projection, SDPA, output projection) on x (B, L, D)
        against keys and values (B', h, Q, hd). The B / B' rows of a clip (its candidates) ask the
        same keys: with no mask across the visual tokens, they are simply more queries of that clip,
        so the keys and values are used as they are, never copied per candidate."""
        D, h = self.attn.embed_dim, self.attn.num_heads
        B, L, _ = x.shape
        clips = k.shape[0]
        q = F.linear(x, self.attn.in_proj_weight[:D], self.attn.in_proj_bias[:D])  # (B, L, D)
        q = q.reshape(clips, (B // clips) * L, h, D // h).transpose(1, 2)  # (B', h, n * L, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B', h, n * L, hd)
        out = out.transpose(1, 2).reshape(B, L, D)
        return self.attn.out_proj(out)


class GatedBlock(nn.Module):
    """Wraps one GPT-2 block: the gated layer runs first, on the visual context set by Narrator."""

    def __init__(self, block: nn.Module, gated: GatedCrossAttention):
        super().__init__()
        self.block = block
        self.gated = gated
        self.visual: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None  # context, or its K/V

    def forward(self, hidden_states, *args, **kwargs):
        if self.visual is not None:
            hidden_states = self.gated(hidden_states, self.visual)
        return self.block(hidden_states, *args, **kwargs)


def _cache_argument(lm: nn.Module) -> str:
    """transformers 5 names the KV cache `cache`; 4.x named it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


class Narrator(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.config = json.loads(json.dumps(config))
        known = {"video", "lm", "num_queries", "cross_every", "pad_id", "bos_id", "eos_id", "freeze_lm",
                 "freeze_visual", "sampling", "tokenizer", "name", "description"}
        for key in config:
            if key not in known:
                raise ConfigError(f"narrator config: unknown key '{key}' (expected: {', '.join(sorted(known))})")
        # any mmvssl video encoder: the VATT transformer (either stem) or a torchvision network
        self.visual = build_encoders({"video": config["video"]}, "narrator.visual", None)["video"]
        lm_cfg = dict(config["lm"])
        lm_cfg.pop("architectures", None)
        self.lm = GPT2LMHeadModel(GPT2Config(**lm_cfg))
        width, heads = self.lm.config.n_embd, self.lm.config.n_head
        self.pooler = AttentionPooler(width, self.visual.width, config.get("num_queries", 256), heads)
        every = int(config.get("cross_every", 1))
        blocks = self.lm.transformer.h
        for i in range(len(blocks)):
            if i % every == 0:
                blocks[i] = GatedBlock(blocks[i], GatedCrossAttention(width, heads))
        self.pad_id, self.bos_id, self.eos_id = config["pad_id"], config["bos_id"], config["eos_id"]
        self._cache_arg = _cache_argument(self.lm)
        self.tokenizer_file: str | None = None  # saved beside the weights by save_pretrained
        self.set_frozen(config.get("freeze_lm", False), config.get("freeze_visual", True))

    def set_frozen(self, lm: bool, visual: bool) -> None:
        """Freeze the language model and/or the visual encoder; the new layers always train. A frozen
        visual encoder also stays in eval mode, so the running statistics of its BatchNorm layers
        (a conv stem's, a CNN's) keep the values it was trained with."""
        for p in self.visual.parameters():
            p.requires_grad_(not visual)
        for name, p in self.lm.named_parameters():
            p.requires_grad_(not lm or ".gated." in name)
        self.visual_frozen = bool(visual)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Narrator":
        super().train(mode)
        if self.visual_frozen:
            self.visual.eval()
        return self

    @property
    def gated_blocks(self) -> list[GatedBlock]:
        return [b for b in self.lm.transformer.h if isinstance(b, GatedBlock)]

    def encode_visual(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, num_queries, lm width): the context the text attends to.
        The pooler sees every output token of the video encoder, its aggregation token included."""
        out = self.visual(video)
        return self.pooler(torch.cat([out["pooled"][:, None], out["tokens"]], dim=1))

    def visual_kv(self, visual: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The keys and values every gated layer projects from a (B, Q, D) visual context: computed
        once per clip, then given to lm_forward in place of the context at every generated token."""
        return [block.gated.visual_kv(visual) for block in self.gated_blocks]

    def lm_forward(self, input_ids: torch.Tensor, visual: torch.Tensor | list | None, attention_mask=None,
                   cache=None, use_cache: bool = False):
        """GPT-2 over input_ids with the visual context in its gated layers; returns (logits, cache).
        visual: the (B', Q, D) context or visual_kv's list; B' may divide the batch (a clip's
        candidates are consecutive rows)."""
        blocks = self.gated_blocks
        per_block = visual if isinstance(visual, list) else [visual] * len(blocks)
        if len(per_block) != len(blocks):
            raise ValueError(f"lm_forward: {len(per_block)} visual key/value pairs for {len(blocks)} gated layers")
        for block, context in zip(blocks, per_block):
            block.visual = context
        try:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                          **{self._cache_arg: cache})
        finally:
            for block in self.gated_blocks:
                block.visual = None
        new_cache = getattr(out, "cache", None) if self._cache_arg == "cache" else getattr(out, "past_key_values", None)
        return out.logits, new_cache

    def forward(self, video: torch.Tensor | dict, input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forced next-token cross-entropy; input_ids (B, L) = bos, text..., eos, pad...
        Called with a training batch (the engine's way), reads its `video` and `narration`."""
        if isinstance(video, dict):
            video, input_ids = video["video"], video["narration"]
        attention = (input_ids != self.pad_id).long()
        logits, _ = self.lm_forward(input_ids, self.encode_visual(video), attention_mask=attention)
        targets = input_ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)  # padding ignored
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return {"caption_loss": loss, "logits": logits}

    # ---- persistence, as for MultimodalModel: config.json + model.safetensors (+ tokenizer file)
    def save_pretrained(self, folder: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None) -> None:
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(folder) as tmp:  # fsynced, then swapped in: the old folder outlives the swap
            config = dict(self.config)
            tokenizer_file = tokenizer_file or self.tokenizer_file
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
                config["tokenizer"] = "tokenizer.model"
            elif folder.joinpath("tokenizer.model").is_file():
                shutil.copyfile(folder / "tokenizer.model", tmp / "tokenizer.model")
            (tmp / "config.json").write_text(json.dumps({"kind": "narrator", **config}, indent=2))
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            state.pop("lm.lm_head.weight", None)  # tied to the token embedding
            save_file(state, str(tmp / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Narrator":
        folder = Path(folder)
        cfg_file, weights = folder / "config.json", folder / "model.safetensors"
        for f in (cfg_file, weights):
            if not f.is_file():
                raise ConfigError(f"not a saved narrator: {f} is missing")
        config = json.loads(cfg_file.read_text())
        if config.pop("kind", None) != "narrator":
            raise ConfigError(f"{cfg_file}: not a narrator (no \"kind\": \"narrator\")")
        check_config_fits_weights(lambda: cls(config), cfg_file, weights, optional=("lm.lm_head.weight",))
        model = cls(config)
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        missing = [k for k in missing if k != "lm.lm_head.weight"]
        if missing or unexpected:
            raise ConfigError(f"{weights}: does not match {cfg_file.name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.lm.tie_weights()
        return model
