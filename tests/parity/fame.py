"""FAME (Mark12Ding/FAME, moco/loader.py, class FAME): the static foreground mask of a clip and the
merge, run through mmvssl.methods.fame on the official cases (README-motion.md, section 1)."""

from __future__ import annotations

import torch

from mmvssl.methods.fame import BACKGROUND_SAMPLE, FOREGROUND_SAMPLE, blur_kernel_size, colour_coordinates, \
    fame_steps, gaussian_blur, merge, rgb_to_hsv
from tests.parity.margins import U, assert_margin, distance_from_half, topk_cut_gaps

INPUTS = ("clips_uint8", "video", "perm")  # perm: the official torch.randperm draw, applied as stored
OUTPUTS = ("im_diff", "motion_mask", "refine_mask", "seg_score", "mask", "fused", "fused_uint8",
           "derived_hsv_mean_frame", "derived_color_coords", "derived_color_index")
DIAGNOSTICS = ()
TOLERANCES = {}  # the README's float32 tolerance (rtol 1e-5, atol 1e-6); mask, index and uint8 exact


def assert_cut_is_clear(blurred: torch.Tensor, count: int, roundings: int, largest: bool, what: str) -> None:
    """A top-k (or bottom-k) of a blurred map of non-negative terms, taken after min-max normalisation
    (a monotone map: the order is the blurred map's). Every term being >= 0, a value b computed in
    any order is within `roundings` U b of the exact one, so two CPUs' b differ by 2 roundings U b
    and the gap at the cut by 2 roundings U (b_k + b_k+1): it must exceed that."""
    b = blurred.flatten(1).sort(dim=1, descending=largest).values  # (B, H W)
    bound = 2 * roundings * U * (b[:, count - 1] + b[:, count])
    assert_margin(topk_cut_gaps(blurred.flatten(1), count, largest), bound, what)


def assert_decisions_are_clear(video: torch.Tensor, steps: dict, fused: torch.Tensor, beta: float) -> None:
    """mask, derived_color_index and fused_uint8 are compared exactly, and the histograms behind
    refine_mask and seg_score count pixels picked by top-k cuts of the motion map and binned by
    rounding: each deciding value must be clear of its cut by more than the float error (issue 28;
    the README's own margins, gap_topk_* and min_color_coord_margin, are the same quantities)."""
    T, H, W = video.shape[2:]
    k = blur_kernel_size(H)
    # roundings of a blurred value, generously counted: the blur's k^2 products and sums and its
    # weights (exp, normalised: ~2 k + 6); for the motion map also im_diff's sum of 3 channels and
    # mean of T - 1 differences (~T + 1, counted 3 T). The cases' gaps are 3x these bounds or more
    blur_roundings = k * k + 2 * k + 6
    motion = gaussian_blur(steps["im_diff"], k)
    assert_cut_is_clear(motion, int(FOREGROUND_SAMPLE * H * W), 3 * T + blur_roundings, True,
                        "fame: the foreground sample's cut of motion_mask")
    assert_cut_is_clear(motion, int(BACKGROUND_SAMPLE * H * W), 3 * T + blur_roundings, False,
                        "fame: the background sample's cut of motion_mask")
    # refine_mask is elementwise from integer counts (exact anywhere): only its blur rounds
    assert_cut_is_clear(gaussian_blur(steps["refine_mask"], k), int(beta * H * W), blur_roundings, True, "fame mask")
    # the colour index: the mean frame is the one reduction (each mean within (T - 1) U mean of the
    # exact one); the hue's sextant and its wrap at 0 follow which channel is largest and the sign of
    # the other two's difference: every pair of channels apart by more than 4 (T - 1) U
    mean = video.mean(dim=2)  # (B, 3, H, W) as fame_steps takes it
    pairs = torch.stack([(mean[:, i] - mean[:, j]).abs() for i, j in ((0, 1), (0, 2), (1, 2))])
    assert_margin(pairs, 4 * (T - 1) * U * mean.amax(), "fame derived_color_index: channels of the mean frame")
    # ... and each coordinate (9 x + 1) clear of .5. Ours is off the exact value (float64 from the
    # float64 mean frame) by `error`; another CPU's runs the same elementwise chain (IEEE-rounded: the
    # same bits, but cos / sin's last ulps) on a mean frame that may round differently, so it is off
    # by at most the chain's error -- bounded by the largest of ours over the case (which includes
    # this) -- plus the mean's rounding moved through the chain (`move`: float64 Jacobian times
    # (T - 1) U mean, first order). The cases' margins are 2.5x that bound or more.
    with torch.enable_grad():
        mean64 = video.double().mean(dim=2).requires_grad_()
        coords64 = colour_coordinates(rgb_to_hsv(mean64))
        move = torch.stack([(torch.autograd.grad(coords64[:, c].sum(), mean64, retain_graph=True)[0].abs()
                             * (T - 1) * U * mean64.detach()).sum(dim=1) for c in range(3)], dim=1)  # (B, 3, H, W)
    error = (steps["colour_coords"].double() - coords64.detach()).abs()
    assert_margin(distance_from_half(steps["colour_coords"].double()), error + error.max() + move,
                  "fame derived_color_index: colour coordinates against round's .5")
    # fused holds the input's own values (mask is 0 / 1), so fused * 255 is an integer to two roundings
    assert_margin(distance_from_half(fused * 255), 2 * 255 * 2 * U, "fame fused_uint8: round(fused * 255)")


def compute(tensors: dict, meta: dict) -> dict:
    video = tensors["video"]  # (B, 3, T, H, W) in [0, 1]
    assert int(meta["crop_size"]) == video.shape[-1] == video.shape[-2], "FAME's crop size is H = W"
    steps = fame_steps(video, beta=float(meta["beta"]))
    fused = merge(video, steps["mask"], tensors["perm"])
    assert_decisions_are_clear(video, steps, fused, float(meta["beta"]))
    return {"im_diff": steps["im_diff"], "motion_mask": steps["motion_mask"], "refine_mask": steps["refine_mask"],
            "seg_score": steps["seg_score"], "mask": steps["mask"], "fused": fused,
            "fused_uint8": (fused * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1),
            "derived_hsv_mean_frame": steps["hsv"], "derived_color_coords": steps["colour_coords"],
            "derived_color_index": steps["colour_index"]}
