"""Zero-shot classification: class names through prompt templates into the text tower, averaged
over templates (CLIP's prompt ensembling), then every clip goes to its most similar class.

Video is classified in `vat`, where text meets video; audio in `vat` too, reached through the
va->vat head (`model.encode_audio(x, space="vat")`, MMV).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.text import tokenizer_for
from .accuracy import classification_metrics
from .tasks import prompt_name


@torch.no_grad()
def class_embeddings(model, classes: list[str], templates: list[str]) -> torch.Tensor:
    """(C, D) one unit vector per class: the normalised mean of its normalised prompt embeddings."""
    model.eval()
    tokenizer = tokenizer_for(model, model.config.get("text", {}).get("context_length", 77))
    weights = []
    for name in classes:
        prompts = [t.format(prompt_name(name)) for t in templates]
        z = model.encode_text(tokenizer(prompts), space="vat")  # (P, D), normalised
        weights.append(F.normalize(z.mean(dim=0), dim=-1))
    return torch.stack(weights)


def zeroshot_scores(embeddings: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """(N, D) clip embeddings x (C, D) class embeddings -> (N, C) cosine scores."""
    return F.normalize(embeddings, dim=-1) @ class_weights.T


def zeroshot_classify(embeddings: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor) -> tuple[dict, torch.Tensor]:
    scores = zeroshot_scores(embeddings, class_weights)
    return classification_metrics(scores, targets, class_weights.shape[0]), scores
