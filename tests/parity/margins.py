"""Margins of the parity cases' discrete outputs (issue 28): masks, indices, uint8 maps and accuracies
that come out of a float comparison (top-k, argmax, rounding) are compared exactly with the official
ones, which holds on every CPU only if the value that decides each of them is farther from its cut
than the float error of the computation. The checkers assert that here, on mmvssl's own float values,
with a bound derived from the computation: a case with a real near-tie fails by name instead of
passing on one CPU and failing on the next.

Across CPUs, BLAS kernels and thread counts, only reductions (sums, dot products, convolutions: their
order) and transcendental functions (a few ulps) round differently; IEEE elementwise +, -, *, / are
correctly rounded and give the same bits everywhere. float32's unit roundoff is U = 2^-24 (~6e-8):
a sum of n terms in any order is within (n - 1) U sum|terms| of the exact sum, so two orders differ
by at most twice that.
"""

from __future__ import annotations

import torch

U = 2.0 ** -24  # float32 unit roundoff


def dot_error(dim: int, scale: float = 1.0) -> float:
    """Bound on how far two float32 evaluations (two kernels) of a dot product of two vectors of
    dimension `dim` and norm <= 1 can differ, times `scale`: each is within dim U of the exact value
    (dim products and dim - 1 sums, sum of |x_i y_i| <= |x| |y| <= 1), so 2 dim U apart."""
    return 2 * dim * U * scale


def topk_cut_gaps(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """(N, M) scores -> (N,) the gap between the k-th and (k+1)-th best of each row (inf where a row
    has no (k+1)-th finite score: its top k cannot change)."""
    if k >= scores.shape[1]:
        return torch.full(scores.shape[:1], float("inf"), dtype=scores.dtype)
    s = scores.sort(dim=1, descending=largest).values
    gap = (s[:, k - 1] - s[:, k]).abs()
    return torch.where(torch.isfinite(s[:, k - 1]) & torch.isfinite(s[:, k]), gap, torch.full_like(gap, float("inf")))


def distance_from_half(values: torch.Tensor) -> torch.Tensor:
    """How far each value is from a rounding boundary (x.5) of torch.round."""
    return ((values - values.floor()) - 0.5).abs()


def assert_margin(margin: torch.Tensor, bound, what: str) -> None:
    """Every deciding margin above its float error bound (a tensor of the same shape, or a number);
    else a near-tie that another CPU may decide the other way: compare it tie-aware instead."""
    margin = torch.as_tensor(margin, dtype=torch.float64)
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(margin)
    slack = margin - bound
    if slack.numel() and not bool((slack > 0).all()):
        i = int(slack.flatten().argmin())
        raise AssertionError(f"{what}: a near-tie: margin {margin.flatten()[i].item():.3g} is not above the float "
                             f"error bound {bound.flatten()[i].item():.3g} (entry {i}); another CPU may decide it the "
                             f"other way, so compare it tie-aware instead of exactly")
