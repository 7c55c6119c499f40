"""An objective is a list of terms read from config: (name, loss, two inputs, weight).

A term with `loss: model` takes one input, a loss the model computed itself (the narrator's
captioning cross-entropy, `caption_loss`), and only weights and logs it.

Distillation terms (`distill_frames`, `distill_clip`, see distill.py) take [student, teacher]:
a student output of the model (`video_frames`, `video_vat`, ...) and a teacher feature the
engine put in the batch (`teacher_frames`). Each owns a predictor MLP from the student's width
to the teacher's, built from `feature_dims` (name -> last dimension), which the engine supplies.

The engine knows no method by name: it calls the objective on the model's embeddings and the
batch, and gets the weighted sum plus every term's value for logging. A term is on when its
weight is positive. Masks come from the batch: `has_<modality>` per sample and `text_mask`
per MIL-NCE candidate.

Temperatures are fixed numbers or learnable parameters of the objective (stored as a log, so
they stay positive, and clamped to [min_temperature, max_temperature] in the forward pass, as
open_clip clamps CLIP's logit scale). `generated_temperature` (NCE and MIL-NCE terms with a
text input) is a separate, fixed temperature: pairs whose text is a pseudo-narration (the batch's
`text_generated`) use it for their rows. An `ssl_clip` term is
LaViLa's SSLCLIPLoss: CLIP's symmetric loss with a scale per pair (ground truth, pseudo, mixed:
the geometric mean) and a second temperature, `pseudo_temperature`, for pseudo-narrations (the
batch's `text_generated`: narrator outputs; human and rephrased narrations are ground truth), held
as a log parameter of the objective, trained when the term is learnable. SigLIP terms carry a
bias, learnable with the temperature. The engine gives these parameters to the optimizer (never weight-decayed) and
saves them in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..modalities import modality_of, presence_key
from .contrastive import LOSSES
from .distill import DISTANCES, DISTILL_LOSSES, Predictor


@dataclass
class Term:
    name: str
    loss: str
    inputs: tuple[str, str]
    weight: float
    temperature: float
    learnable: bool
    bias: float = -10.0
    generated_temperature: float | None = None
    distance: str = "cosine"
    pseudo_temperature: float | None = None


class Objective(nn.Module):
    def __init__(self, terms: list[dict], temperature: float = 0.07, learnable_temperature: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 1.0,
                 feature_dims: dict[str, int] | None = None):
        super().__init__()
        self.min_temperature, self.max_temperature = min_temperature, max_temperature
        self.terms: list[Term] = []
        self.log_temperature = nn.ParameterDict()  # one learnable log-temperature per learnable term
        self.bias = nn.ParameterDict()  # one learnable bias per learnable SigLIP term
        # LaViLa's pseudo scale, one per ssl_clip term: a log temperature, trained when the term is learnable
        self.log_pseudo_temperature = nn.ParameterDict()
        self.predictors = nn.ModuleDict()  # one predictor MLP per distillation term
        for i, t in enumerate(terms):
            name = t.get("name") or f"term{i}"
            if t.get("loss") not in LOSSES and t.get("loss") not in DISTILL_LOSSES and t.get("loss") != "model":
                raise ConfigError(f"objective.terms[{i}] '{name}': unknown loss '{t.get('loss')}' "
                                  f"(available: {', '.join([*LOSSES, *DISTILL_LOSSES])}, model)")
            inputs = tuple(t.get("inputs") or ())
            if t["loss"] in DISTILL_LOSSES:
                if float(t.get("weight", 1.0)) > 0:
                    self._add_distill_term(i, name, t, inputs, feature_dims or {})
                continue
            if t["loss"] == "model":
                if len(inputs) != 1:
                    raise ConfigError(f"objective.terms[{i}] '{name}': a 'model' term names one input, the loss "
                                      f"the model computes; got {list(inputs)}")
                if float(t.get("weight", 1.0)) > 0:
                    self.terms.append(Term(name, "model", inputs, float(t.get("weight", 1.0)), temperature, False))
                continue
            if len(inputs) != 2:
                raise ConfigError(f"objective.terms[{i}] '{name}': inputs must name two embeddings, got {list(inputs)}")
            tau = t.get("temperature")
            tau = float(temperature if tau is None else tau)
            if not min_temperature <= tau <= max_temperature:
                raise ConfigError(f"objective.terms[{i}] '{name}': temperature {tau} is outside "
                                  f"[objective.min_temperature, objective.max_temperature] = "
                                  f"[{min_temperature}, {max_temperature}]")
            generated_tau = t.get("generated_temperature")
            if generated_tau is not None:
                if t["loss"] not in ("nce", "mil_nce") or "text" not in {modality_of(x) for x in inputs}:
                    raise ConfigError(f"objective.terms[{i}] '{name}': generated_temperature needs an nce or "
                                      f"mil_nce term with a text input, got {t['loss']} on {list(inputs)}")
                if not min_temperature <= float(generated_tau) <= max_temperature:
                    raise ConfigError(f"objective.terms[{i}] '{name}': generated_temperature {generated_tau} is "
                                      f"outside [{min_temperature}, {max_temperature}]")
                generated_tau = float(generated_tau)
            pseudo_tau = t.get("pseudo_temperature")
            if pseudo_tau is not None and t["loss"] != "ssl_clip":
                raise ConfigError(f"objective.terms[{i}] '{name}': pseudo_temperature belongs to an ssl_clip term "
                                  f"(LaViLa's pseudo-narration scale), got loss {t['loss']}")
            pseudo_tau = float(tau if pseudo_tau is None else pseudo_tau)
            if not min_temperature <= pseudo_tau <= max_temperature:
                raise ConfigError(f"objective.terms[{i}] '{name}': pseudo_temperature {pseudo_tau} is outside "
                                  f"[{min_temperature}, {max_temperature}]")
            learnable = t.get("learnable")
            learnable = bool(learnable_temperature if learnable is None else learnable)
            if float(t.get("weight", 1.0)) <= 0:
                continue
            term = Term(name, t["loss"], inputs, float(t.get("weight", 1.0)), tau, learnable,
                        float(t.get("bias", -10.0) if t.get("bias") is not None else -10.0), generated_tau,
                        pseudo_temperature=pseudo_tau if t["loss"] == "ssl_clip" else None)
            self.terms.append(term)
            if term.loss == "ssl_clip":  # a parameter either way, so it is checkpointed with the method
                self.log_pseudo_temperature[name] = nn.Parameter(torch.tensor(math.log(pseudo_tau)),
                                                                 requires_grad=learnable)
            if learnable:
                self.log_temperature[name] = nn.Parameter(torch.tensor(math.log(tau)))
                if term.loss == "siglip":
                    self.bias[name] = nn.Parameter(torch.tensor(term.bias))
        if not self.terms:
            raise ConfigError("objective has no term with a positive weight")

    def _add_distill_term(self, i: int, name: str, t: dict, inputs: tuple, feature_dims: dict[str, int]) -> None:
        where = f"objective.terms[{i}] '{name}'"
        if len(inputs) != 2:
            raise ConfigError(f"{where}: inputs must name [student, teacher], e.g. [video_frames, teacher_frames]; "
                              f"got {list(inputs)}")
        distance = t.get("distance") or "cosine"
        if distance not in DISTANCES:
            raise ConfigError(f"{where}: unknown distance '{distance}' (expected: {', '.join(DISTANCES)})")
        missing = [x for x in inputs if x not in feature_dims]
        if missing:
            raise ConfigError(f"{where}: no width known for {missing} (known: {', '.join(sorted(feature_dims))}); "
                              f"distillation needs a `teacher:` section and a student output the model produces")
        self.predictors[name] = Predictor(feature_dims[inputs[0]], feature_dims[inputs[1]],
                                          int(t.get("predictor_hidden") or 0))
        self.terms.append(Term(name, t["loss"], inputs, float(t.get("weight", 1.0)), 1.0, False, distance=distance))

    @property
    def modalities(self) -> set[str]:
        return {modality_of(x) for t in self.terms if t.loss != "model" for x in t.inputs} - {"teacher"}

    def temperature(self, term: Term) -> float | torch.Tensor:
        if term.name not in self.log_temperature:
            return term.temperature
        return self.log_temperature[term.name].exp().clamp(self.min_temperature, self.max_temperature)

    def pseudo_temperature(self, term: Term) -> torch.Tensor:
        """An ssl_clip term's temperature of pseudo-narration pairs (the inverse of LaViLa's pseudo scale)."""
        return self.log_pseudo_temperature[term.name].exp().clamp(self.min_temperature, self.max_temperature)

    def pair_temperatures(self, term: Term, batch: dict) -> float | torch.Tensor:
        """The term's temperature, or (B,) per pair when generated texts have their own."""
        tau = self.temperature(term)
        generated = batch.get("text_generated")
        if term.generated_temperature is None or generated is None or not bool(generated.any()):
            return tau
        tau = torch.as_tensor(tau, dtype=torch.float32, device=generated.device)
        return torch.where(generated.bool(), torch.tensor(term.generated_temperature, device=generated.device), tau)

    def temperatures(self) -> dict[str, float]:
        """The current temperature of every learnable term, for logging."""
        values = {f"temperature/{t.name}": float(torch.as_tensor(self.temperature(t)).detach())
                  for t in self.terms if t.learnable}
        values.update({f"pseudo_temperature/{t.name}": float(self.pseudo_temperature(t).detach())
                       for t in self.terms if t.learnable and t.loss == "ssl_clip"})
        return values

    def forward(self, embeddings: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, values = 0.0, {}
        for t in self.terms:
            if t.loss in DISTILL_LOSSES:
                values[t.name] = self._distill(t, embeddings, batch)
                total = total + t.weight * values[t.name]
                continue
            for x in t.inputs:
                if x not in embeddings:
                    raise ConfigError(f"objective term '{t.name}' needs embedding '{x}', but the model "
                                      f"produced only: {', '.join(sorted(embeddings))}")
            if t.loss == "model":
                values[t.name] = embeddings[t.inputs[0]].float()
                total = total + t.weight * values[t.name]
                continue
            a, b = (embeddings[x].float() for x in t.inputs)  # losses in fp32 under mixed precision
            mask = None
            for x in t.inputs:
                has = batch.get(presence_key(modality_of(x)))
                if has is not None:
                    mask = has if mask is None else mask & has
            kwargs = {"temperature": self.pair_temperatures(t, batch), "mask": mask}
            if t.loss == "mil_nce" and modality_of(t.inputs[1]) == "text":  # audio: one candidate, no mask
                kwargs["candidate_mask"] = batch.get("text_mask")
            if t.loss == "siglip":
                kwargs["bias"] = self.bias[t.name] if t.name in self.bias else t.bias
            if t.loss == "ssl_clip":
                a, b, kwargs["mask"] = self._one_text(t, a, b, mask, batch)
                kwargs["temperature"] = self.temperature(t)
                kwargs["pseudo_temperature"] = self.pseudo_temperature(t)
                generated = batch.get("text_generated")  # narrator outputs; human and rephrased texts are truth
                kwargs["ground_truth"] = None if generated is None else ~generated.bool()
            value = LOSSES[t.loss](a, b, **kwargs)
            values[t.name] = value
            total = total + t.weight * value
        return total, values

    @staticmethod
    def _one_text(t: Term, a: torch.Tensor, b: torch.Tensor, mask, batch: dict):
        """ssl_clip pairs each clip with one text: (B, 1, D) candidates become (B, D), their mask joined."""
        if a.ndim == 2 and b.ndim == 2:
            return a, b, mask
        texts = a if a.ndim == 3 else b
        if texts.shape[1] != 1:
            raise ConfigError(f"objective term '{t.name}': ssl_clip pairs each clip with one text (LaViLa's "
                              f"CLIPLoss), got {texts.shape[1]} candidates per clip: set data.num_candidates=1")
        candidate = batch.get("text_mask")
        if candidate is not None:
            mask = candidate[:, 0].bool() if mask is None else mask & candidate[:, 0].bool()
        return (a[:, 0] if a.ndim == 3 else a), (b[:, 0] if b.ndim == 3 else b), mask

    def _distill(self, t: Term, embeddings: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        student, teacher = t.inputs
        if student not in embeddings:
            raise ConfigError(f"objective term '{t.name}' needs the student output '{student}', but the model "
                              f"produced only: {', '.join(sorted(embeddings))}")
        if teacher not in batch:
            raise ConfigError(f"objective term '{t.name}' needs '{teacher}' in the batch: configure the "
                              f"`teacher:` section (teacher.arch, teacher.pretrained)")
        prediction = self.predictors[t.name](embeddings[student].float())  # losses in fp32
        return DISTILL_LOSSES[t.loss](prediction, batch[teacher], mask=batch.get(presence_key(modality_of(student))),
                                      distance=t.distance)
