"""Contrastive losses as pure functions on (already normalised) embeddings.

Every loss gathers the other processes' embeddings as negatives (gradients flow back to their
owners) and computes only the local rows of the logits, labels offset by rank (open_clip's
`local_loss`). A sample mask keeps samples that lack a modality out of the loss entirely: they
are neither anchors nor negatives.

Normalisation is global: each process returns `world * (sum of its anchors' losses) / (valid
anchors over all processes)`, so the mean over processes -- what DDP's gradient averaging
differentiates -- is exactly the loss of one process on the concatenated batch.
`temperature` is a float or a 0-d tensor (learnable temperatures come from the Objective);
NCE and MIL-NCE also take a (B,) tensor, one temperature per local pair, which divides every
logit of that pair's rows (LaViLa's separate temperatures for human and generated texts).

The references each follows (their tests: tests/test_losses.py, tests/test_methods_mechanisms.py,
tests/parity/lavila.py):
- `nce_loss`: CLIP's symmetric loss as open_clip's `ClipLoss` (equal to it in tests/test_losses.py);
- `mil_nce_loss`: google-research/google-research vatt/utils/train/objectives.py `AsymmetricNCE` (one
  softmax per video over both directions, MIL-NCE over its candidates), with the positive pairs once in
  the denominator where AsymmetricNCE has them twice (per video: released = log(exp(mmvssl) + 1));
- `nt_xent_loss`: google-research/simclr objective.py `add_contrastive_loss` and CVRL's
  tensorflow/models official/projects/video_ssl/losses/losses.py `contrastive_loss`, their two
  directions averaged where those sum them (half their value);
- `siglip_loss`: the SigLIP paper and open_clip's `SigLipLoss`;
- `ssl_clip_loss`: facebookresearch/LaViLa lavila/models/loss.py `SSLCLIPLoss` (parity cases).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import gather_no_grad, gather_with_grad, world

NEG_INF = -1e4  # finite, so fully masked rows stay NaN-free (the row is excluded anyway)


def _default_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask.bool()


def _per_row(temperature: float | torch.Tensor, ndim: int) -> float | torch.Tensor:
    """A scalar as is; a (B,) temperature shaped to divide logits (B, ...) of `ndim` dims row by row."""
    if isinstance(temperature, torch.Tensor) and temperature.ndim == 1:
        return temperature.view(-1, *([1] * (ndim - 1)))
    return temperature


def global_mean(per_anchor: torch.Tensor, mask: torch.Tensor, all_mask: torch.Tensor) -> torch.Tensor:
    """This process's share of the mean over every valid anchor of every process (see module doc)."""
    _, size = world()
    return (per_anchor * mask).sum() * size / all_mask.sum().clamp(min=1)


def nce_loss(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor = 0.07,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP; VATT's NCE for video-audio) between paired rows of a, b (B, D).

    Returns the mean over valid anchors i of (CE(a_i -> all b) + CE(b_i -> all a)) / 2.
    """
    B = a.shape[0]
    mask = _default_mask(a, mask)
    rank, _ = world()
    all_a, all_b, all_mask = gather_with_grad(a), gather_with_grad(b), gather_no_grad(mask)
    labels = torch.arange(B, device=a.device) + rank * B
    invalid = ~all_mask[None, :]
    tau = _per_row(temperature, 2)
    logits_ab = (a @ all_b.T / tau).masked_fill(invalid, NEG_INF)  # (B, world * B)
    logits_ba = (b @ all_a.T / tau).masked_fill(invalid, NEG_INF)
    per_sample = 0.5 * (F.cross_entropy(logits_ab, labels, reduction="none")
                        + F.cross_entropy(logits_ba, labels, reduction="none"))  # (B,)
    return global_mean(per_sample, mask.float(), all_mask.float())


def ssl_clip_scales(ground_truth: torch.Tensor, all_ground_truth: torch.Tensor, temperature: float | torch.Tensor,
                    pseudo_temperature: float | torch.Tensor | None = None) -> torch.Tensor:
    """LaViLa's per-pair logit scale (B, N) for local rows `ground_truth` (B,) and gathered columns
    (N,): 1 / temperature where both samples are ground truth, 1 / pseudo_temperature where both are
    pseudo-narrations, their geometric mean sqrt(scale * pseudo scale) where they are mixed."""
    scale = 1 / torch.as_tensor(temperature, dtype=torch.float32, device=ground_truth.device)
    pseudo = scale if pseudo_temperature is None else 1 / torch.as_tensor(
        pseudo_temperature, dtype=torch.float32, device=ground_truth.device)
    both = ground_truth.long()[:, None] + all_ground_truth.long()[None, :]  # (B, N): 0, 1 or 2 ground truths
    return torch.where(both == 2, scale, torch.where(both == 0, pseudo, torch.sqrt(scale * pseudo)))


def ssl_clip_loss(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor = 0.07,
                  mask: torch.Tensor | None = None, pseudo_temperature: float | torch.Tensor | None = None,
                  ground_truth: torch.Tensor | None = None) -> torch.Tensor:
    """LaViLa's SSLCLIPLoss (facebookresearch/LaViLa lavila/models/loss.py): CLIPLoss -- the mean of
    the video-to-text and text-to-video cross-entropies over paired rows of a, b (B, D) -- with each
    logit a_i . b_j scaled by ssl_clip_scales of samples i and j (`ground_truth` (B,): human or
    rephrased narrations True, narrator outputs False). Without pseudo pairs it is CLIPLoss, the
    same as nce_loss."""
    B = a.shape[0]
    mask = _default_mask(a, mask)
    truth = torch.ones(B, dtype=torch.bool, device=a.device) if ground_truth is None else ground_truth.bool()
    rank, _ = world()
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    all_mask, all_truth = gather_no_grad(mask), gather_no_grad(truth)
    labels = torch.arange(B, device=a.device) + rank * B
    scales = ssl_clip_scales(truth, all_truth, temperature, pseudo_temperature)  # (B, N), symmetric in (i, j)
    invalid = ~all_mask[None, :]
    logits_ab = (a @ all_b.T * scales).masked_fill(invalid, NEG_INF)  # (B, N): video i against every text
    logits_ba = (b @ all_a.T * scales).masked_fill(invalid, NEG_INF)
    per_sample = 0.5 * (F.cross_entropy(logits_ab, labels, reduction="none")
                        + F.cross_entropy(logits_ba, labels, reduction="none"))  # (B,)
    return global_mean(per_sample, mask.float(), all_mask.float())


@torch.no_grad()
def ssl_clip_accuracy(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor = 0.07,
                      pseudo_temperature: float | torch.Tensor | None = None,
                      ground_truth: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """LaViLa's accuracies of one process's batch, in percent: the rows of the scaled video-to-text
    logits whose argmax is their own text, over all rows (`acc`), ground-truth rows (`acc_gt`) and
    pseudo rows (`acc_pseudo`; NaN where there are none)."""
    B = a.shape[0]
    truth = torch.ones(B, dtype=torch.bool, device=a.device) if ground_truth is None else ground_truth.bool()
    logits = a @ b.T * ssl_clip_scales(truth, truth, temperature, pseudo_temperature)
    correct = (logits.argmax(dim=1) == torch.arange(B, device=a.device)).float()
    return {"acc": 100 * correct.mean(), "acc_gt": 100 * correct[truth].mean(), "acc_pseudo": 100 * correct[~truth].mean()}


def nt_xent_loss(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor = 0.1,
                 mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """NT-Xent (SimCLR, CVRL) between two views a, b (B, D): each of the 2N views is an anchor
    whose positive is its pair and whose negatives are the other 2N - 2 views of both sides.

    Returns the mean over valid anchors i of (CE(a_i) + CE(b_i)) / 2; with reduction="sum", of
    CE(a_i) + CE(b_i): the two directions summed, as SimCLR's and CVRL's loss_a + loss_b.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"nt_xent_loss: reduction must be 'mean' or 'sum' (of the two directions), "
                         f"got '{reduction}'")
    B = a.shape[0]
    mask = _default_mask(a, mask)
    rank, _ = world()
    all_a, all_b, all_mask = gather_with_grad(a), gather_with_grad(b), gather_no_grad(mask)
    N = all_a.shape[0]
    own = torch.arange(B, device=a.device) + rank * B
    candidates = torch.cat([all_a, all_b], dim=0)  # (2N, D): columns 0..N-1 are a, N..2N-1 are b
    keep = torch.cat([all_mask, all_mask])[None, :].expand(B, 2 * N).clone()  # (B, 2N)
    per_side = []
    for anchor, self_col, pos_col in ((a, own, own + N), (b, own + N, own)):
        logits = anchor @ candidates.T / temperature  # (B, 2N)
        drop = keep.clone()
        drop[torch.arange(B), self_col] = False  # an anchor is not its own negative
        per_side.append(F.cross_entropy(logits.masked_fill(~drop, NEG_INF), pos_col, reduction="none"))
    scale = 1.0 if reduction == "sum" else 0.5
    return global_mean(scale * (per_side[0] + per_side[1]), mask.float(), all_mask.float())


def mil_nce_loss(video: torch.Tensor, text: torch.Tensor, temperature: float | torch.Tensor = 0.07,
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
    mask = _default_mask(video, mask)
    cand = torch.ones(B, K, dtype=torch.bool, device=video.device) if candidate_mask is None else candidate_mask.bool()
    cand = cand & mask[:, None]
    rank, _ = world()
    all_v, all_t = gather_with_grad(video), gather_with_grad(text)  # (N, D), (N, K, D)
    all_mask, all_cand = gather_no_grad(mask), gather_no_grad(cand)  # (N,), (N, K)
    N = all_v.shape[0]
    own = torch.arange(B, device=video.device) + rank * B  # global index of each local clip

    # row: local clip i against every text candidate of every clip j -> (B, N, K)
    tau = _per_row(temperature, 3)  # clip i's rows and columns use its temperature
    row = torch.einsum("bd,nkd->bnk", video, all_t) / tau
    row = row.masked_fill(~all_cand[None], NEG_INF)
    positives = row[torch.arange(B), own].masked_fill(~cand, NEG_INF)  # (B, K)
    # column: candidates of local clip i against the other clips' videos -> (B, K, N)
    col = torch.einsum("bkd,nd->bkn", text, all_v) / tau
    other = torch.ones(B, N, dtype=torch.bool, device=video.device)
    other[torch.arange(B), own] = False
    keep_col = cand[:, :, None] & (other & all_mask[None])[:, None, :]
    col = col.masked_fill(~keep_col, NEG_INF)

    numerator = torch.logsumexp(positives, dim=1)  # (B,)
    denominator = torch.logsumexp(torch.cat([row.reshape(B, -1), col.reshape(B, -1)], dim=1), dim=1)
    return global_mean(denominator - numerator, mask.float(), all_mask.float())


def siglip_loss(a: torch.Tensor, b: torch.Tensor, temperature: float | torch.Tensor = 0.1,
                bias: float | torch.Tensor = -10.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP (Zhai et al. 2023): every pair (i, j) is a binary problem, positive iff i == j.

      loss = -1/|B| sum_i sum_j log sigmoid(z_ij * (a_i.b_j / temperature + bias)),  z_ii = 1, z_ij = -1
    over valid samples (the paper's init: temperature 0.1, bias -10). Gathering all of b and
    computing the local rows gives the same sum as the paper's neighbour exchange.
    """
    B = a.shape[0]
    mask = _default_mask(a, mask)
    rank, _ = world()
    all_b, all_mask = gather_with_grad(b), gather_no_grad(mask)
    own = torch.arange(B, device=a.device) + rank * B
    logits = a @ all_b.T / temperature + bias  # (B, N)
    signs = -torch.ones_like(logits)
    signs[torch.arange(B), own] = 1.0
    pair_loss = -F.logsigmoid(signs * logits) * all_mask[None, :].float()  # (B, N); masked columns out
    return global_mean(pair_loss.sum(dim=1), mask.float(), all_mask.float())


LOSSES = {"nce": nce_loss, "nt_xent": nt_xent_loss, "mil_nce": mil_nce_loss, "siglip": siglip_loss,
          "ssl_clip": ssl_clip_loss}
