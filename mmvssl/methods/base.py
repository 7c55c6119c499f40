"""The method unit: what a user picks (`method.name` in a config, `configs/methods/<name>.yaml`).

A method builds the model it trains (the student, which is what gets saved and shipped) and owns
everything else its loss needs: loss terms and their temperatures, projection or prediction
heads used only in training, teachers (an EMA copy of the student, a frozen image model),
centres, queues. The engine calls, per step:

    batch = method.prepare(batch)               # once per batch, on the device (teacher features, targets)
    embeddings = method.embed(model, batch)     # student (and teacher) outputs; per micro-batch
    loss, terms = method(embeddings, batch)     # the weighted loss and every term, for logging
    ... backward, optimizer step ...
    method.after_step(model, step)              # EMA / momentum / centre updates, schedules of the step

and nothing else: it knows no method by name. The method's own state (its `state_dict`: heads,
temperatures, teachers, centres) is checkpointed with the run and never shipped with the model.
Parameters of the method that train (heads, predictors, temperatures) are optimised with the
model; their gradients are averaged across processes by the engine (they live outside DDP).

Each method declares its options as a dataclass (`Options`); `method.options` in the config is
checked against it, so a misspelt key is one line naming the key and the method.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from ..errors import ConfigError


@dataclass
class BuildContext:
    """What a method may use while building: the accelerator (device, process index, printing),
    the run folder, and the training stream's SampleSpec (a method may pair data with it, as the
    cached image teacher does)."""
    accelerator: Any
    out: Any
    spec: Any


class Method(nn.Module):
    name: str = ""
    paper: str = ""  # the paper the method follows, as `mmvssl methods` lists it
    Options: type | None = None  # dataclass of `method.options`

    def __init__(self):
        super().__init__()
        self.modalities: set[str] = {"video"}  # batch inputs the method reads; others are not moved or encoded

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: DictConfig, ctx: BuildContext) -> tuple[nn.Module, "Method"]:
        """(student model, method) from the experiment config."""
        raise NotImplementedError

    @classmethod
    def options(cls, cfg: DictConfig):
        """`method.options` checked against the method's Options dataclass (an instance of it)."""
        given = OmegaConf.to_container(cfg.method.options, resolve=True) if cfg.method.options else {}
        if cls.Options is None:
            if given:
                raise ConfigError(f"method '{cls.name}' takes no method.options (got {', '.join(given)})")
            return None
        names = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = [k for k in given if k not in names]
        if unknown:
            raise ConfigError(f"method.options.{unknown[0]}: method '{cls.name}' has no such option "
                              f"(expected: {', '.join(sorted(names))})")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls.Options), given)
        except OmegaConfBaseException as e:
            raise ConfigError(f"method.options: {str(getattr(e, 'msg', e)).splitlines()[0]} "
                              f"(key 'method.options.{getattr(e, 'key', '?')}', method '{cls.name}')") from None
        return OmegaConf.to_object(merged)

    # --- the step -------------------------------------------------------------------------------
    def prepare(self, batch: dict) -> dict:
        """Once per batch, after it reached the device."""
        return batch

    def embed(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The embeddings the loss reads; the default is the model's forward."""
        return model(batch)

    def forward(self, embeddings: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """After optimizer step number `step` (1-based)."""

    # --- optimisation and logging ------------------------------------------------------------------
    def decayed_modules(self) -> list[nn.Module]:
        """Modules of the method whose weight matrices get weight decay (projection heads); every
        other trainable parameter of the method (temperatures, biases) is never decayed."""
        return []

    def log_values(self) -> dict[str, float]:
        """Scalars to log beside the loss terms (temperatures, momentum)."""
        return {}


# --- parts shared by the methods that have a teacher ----------------------------------------------

def frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a copy of the student that takes no gradient (updated by ema_update)."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters and float buffers
    (BYOL, DINO); integer buffers (BatchNorm's counter) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
        else:
            t.copy_(s)


def cosine_schedule(start: float, end: float, step: int, total: int) -> float:
    """From `start` at step 0 to `end` at step `total`, along half a cosine (BYOL's and DINO's
    teacher momentum, DINO's teacher temperature warm-up uses a linear one)."""
    progress = min(1.0, max(0.0, step / max(1, total)))
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def mlp(dim_in: int, hidden: int, dim_out: int, batch_norm: bool = False) -> nn.Sequential:
    """The small head every method builds (projection, prediction and pretext heads):
    Linear - [BatchNorm1d] - ReLU - Linear, on (N, dim_in) -> (N, dim_out)."""
    norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
    return nn.Sequential(nn.Linear(dim_in, hidden), *norm, nn.ReLU(inplace=True), nn.Linear(hidden, dim_out))


def require_output(net: nn.Module, key: str, method: str) -> dict[str, int]:
    """The model's output widths (`output_dims`), after checking that it gives `key`; a one-line
    ConfigError naming the method, the output and the model otherwise."""
    dims = net.output_dims()
    if key not in dims:
        raise ConfigError(f"method '{method}' reads {key}: model '{net.name}' has no such output "
                          f"(a preset with heads.type: projection, e.g. video-tiny)")
    return dims


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
