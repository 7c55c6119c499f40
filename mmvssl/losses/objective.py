"""An objective is a list of terms read from config: (name, loss, two inputs, weight).

The engine knows no method by name: it calls the objective on the model's embeddings and the
batch, and gets the weighted sum plus every term's value for logging. A term is on when its
weight is positive. Masks come from the batch: `has_<modality>` per sample and `text_mask`
per MIL-NCE candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .contrastive import LOSSES


@dataclass
class Term:
    name: str
    loss: str
    inputs: tuple[str, str]
    weight: float


def _modality(embedding_name: str) -> str:
    return embedding_name.split("_", 1)[0]


class Objective(nn.Module):
    def __init__(self, terms: list[dict], temperature: float = 0.07):
        super().__init__()
        self.temperature = temperature
        self.terms: list[Term] = []
        for i, t in enumerate(terms):
            name = t.get("name") or f"term{i}"
            if t.get("loss") not in LOSSES:
                raise ConfigError(f"objective.terms[{i}] '{name}': unknown loss '{t.get('loss')}' "
                                  f"(available: {', '.join(LOSSES)})")
            inputs = tuple(t.get("inputs") or ())
            if len(inputs) != 2:
                raise ConfigError(f"objective.terms[{i}] '{name}': inputs must name two embeddings, got {list(inputs)}")
            if float(t.get("weight", 1.0)) > 0:
                self.terms.append(Term(name, t["loss"], inputs, float(t.get("weight", 1.0))))
        if not self.terms:
            raise ConfigError("objective has no term with a positive weight")

    @property
    def modalities(self) -> set[str]:
        return {_modality(x) for t in self.terms for x in t.inputs}

    def forward(self, embeddings: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, values = 0.0, {}
        for t in self.terms:
            for x in t.inputs:
                if x not in embeddings:
                    raise ConfigError(f"objective term '{t.name}' needs embedding '{x}', but the model "
                                      f"produced only: {', '.join(sorted(embeddings))}")
            a, b = (embeddings[x] for x in t.inputs)
            mask = None
            for x in t.inputs:
                has = batch.get(f"has_{_modality(x)}")
                if has is not None:
                    mask = has if mask is None else mask & has
            kwargs = {"temperature": self.temperature, "mask": mask}
            if t.loss == "mil_nce":
                kwargs["candidate_mask"] = batch.get("text_mask")
            value = LOSSES[t.loss](a, b, **kwargs)
            values[t.name] = value
            total = total + t.weight * value
        return total, values
