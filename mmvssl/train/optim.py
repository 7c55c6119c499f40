"""AdamW with weight decay only on weight matrices, and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos", "token", "embed", "logit_scale", "temperature", "bias", "queries", "gate")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weights of linear and conv layers; never norms, biases, embeddings, positions,
    aggregation tokens or temperatures (1-D tensors and the names above)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = (p.ndim < 2 or any(k in leaf for k in NO_DECAY_NAMES) or "token_embed" in name
                or "relative_bias" in name)  # T5 relative position bias table
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, method: nn.Module | None = None,
                    no_decay_modules: tuple[nn.Module, ...] = (), betas: tuple[float, float] = (0.9, 0.98),
                    eps: float = 1e-6, lr_scale: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW over `model` (param_groups) and the trainable parameters of the method: its
    `decayed_modules()` (projection heads) as the model's, every other one (temperatures, biases,
    predictors of the objective) never decayed, like those of `no_decay_modules`. `lr_scale`
    (model parameter name -> multiplier; layer-wise lr decay) splits the groups by multiplier,
    each at lr x multiplier (the schedule scales every group alike); others stay at lr."""
    decay, no_decay = param_groups(model, weight_decay)
    decayed = list(method.decayed_modules()) if method is not None else []
    for module in decayed:
        d, n = param_groups(module, weight_decay)
        decay["params"] += d["params"]
        no_decay["params"] += n["params"]
    seen = {id(p) for p in decay["params"] + no_decay["params"]}
    for module in [*no_decay_modules, *([method] if method is not None else [])]:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                no_decay["params"].append(p)
    groups = [decay, no_decay]
    if lr_scale:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for g in (decay, no_decay):
            by_scale: dict[float, list] = {}
            for p in g["params"]:
                by_scale.setdefault(float(lr_scale.get(names.get(id(p)), 1.0)), []).append(p)
            groups += [{"params": ps, "weight_decay": g["weight_decay"], "lr": lr * s}
                       for s, ps in sorted(by_scale.items())]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base lr over `warmup_steps`, then cosine to min_ratio * lr."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
