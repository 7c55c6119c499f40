"""Contrastive losses as pure functions on (already normalised) embeddings.

Both gather the other processes' embeddings as negatives (gradients flow to their owners) and
compute the local rows of the logits. A sample mask keeps samples that lack a modality out of
the loss entirely: they are neither anchors nor negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import gather_no_grad, gather_with_grad, world

NEG_INF = -1e4  # finite, so fully masked rows stay NaN-free (the row is excluded anyway)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def nce_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of a (B, D) and b (B, D): VATT's NCE for video-audio.

    mask (B,) bool marks the pairs that exist. Returns the mean over valid local anchors of
    (CE(a_i -> all b) + CE(b_i -> all a)) / 2.
    """
    B = a.shape[0]
    mask = torch.ones(B, dtype=torch.bool, device=a.device) if mask is None else mask.bool()
    rank, _ = world()
    all_a, all_b, all_mask = gather_with_grad(a), gather_with_grad(b), gather_no_grad(mask)
    labels = torch.arange(B, device=a.device) + rank * B
    logits_ab = (a @ all_b.T) / temperature  # (B, world * B)
    logits_ba = (b @ all_a.T) / temperature
    invalid = ~all_mask[None, :]
    logits_ab = logits_ab.masked_fill(invalid, NEG_INF)
    logits_ba = logits_ba.masked_fill(invalid, NEG_INF)
    per_sample = 0.5 * (F.cross_entropy(logits_ab, labels, reduction="none")
                        + F.cross_entropy(logits_ba, labels, reduction="none"))
    return _masked_mean(per_sample, mask.float())


def mil_nce_loss(video: torch.Tensor, text: torch.Tensor, temperature: float = 0.07,
                 mask: torch.Tensor | None = None, candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MIL-NCE (Miech et al. 2020) between video (B, D) and K candidate texts per clip (B, K, D).

    For clip i with positive candidates P_i:
      loss_i = -log( sum_{k in P_i} e^{v_i.t_ik} /
                     ( sum_{j, k} e^{v_i.t_jk} + sum_{j != i, k in P_i} e^{v_j.t_ik} ) )
    all scores divided by the temperature; candidate_mask (B, K) marks real candidates, mask (B,)
    the clips that have text at all.
    """
    if text.ndim == 2:
        text = text[:, None]
    B, K, D = text.shape
    mask = torch.ones(B, dtype=torch.bool, device=video.device) if mask is None else mask.bool()
    cand = torch.ones(B, K, dtype=torch.bool, device=video.device) if candidate_mask is None else candidate_mask.bool()
    cand = cand & mask[:, None]
    rank, _ = world()
    all_v, all_t = gather_with_grad(video), gather_with_grad(text)  # (N, D), (N, K, D)
    all_mask, all_cand = gather_no_grad(mask), gather_no_grad(cand)  # (N,), (N, K)
    N = all_v.shape[0]
    own = torch.arange(B, device=video.device) + rank * B  # global index of each local clip

    # row: local clip i against every text candidate of every clip j -> (B, N, K)
    row = torch.einsum("bd,nkd->bnk", video, all_t) / temperature
    row = row.masked_fill(~all_cand[None], NEG_INF)
    positives = row[torch.arange(B), own].masked_fill(~cand, NEG_INF)  # (B, K)
    # column: candidates of local clip i against the other clips' videos -> (B, K, N)
    col = torch.einsum("bkd,nd->bkn", text, all_v) / temperature
    other = torch.ones(B, N, dtype=torch.bool, device=video.device)
    other[torch.arange(B), own] = False
    keep_col = cand[:, :, None] & (other & all_mask[None])[:, None, :]
    col = col.masked_fill(~keep_col, NEG_INF)

    numerator = torch.logsumexp(positives, dim=1)  # (B,)
    denominator = torch.logsumexp(torch.cat([row.reshape(B, -1), col.reshape(B, -1)], dim=1), dim=1)
    return _masked_mean(denominator - numerator, mask.float())


LOSSES = {"nce": nce_loss, "mil_nce": mil_nce_loss}
