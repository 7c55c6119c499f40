"""FAME (Mark12Ding/FAME, moco/loader.py, class FAME): the static foreground mask of a clip and the
merge, run through mmvssl.methods.fame on the official cases (README-motion.md, section 1)."""

from __future__ import annotations

import torch

from mmvssl.methods.fame import fame_steps, merge

INPUTS = ("clips_uint8", "video", "perm")  # perm: the official torch.randperm draw, applied as stored
OUTPUTS = ("im_diff", "motion_mask", "refine_mask", "seg_score", "mask", "fused", "fused_uint8",
           "derived_hsv_mean_frame", "derived_color_coords", "derived_color_index")
DIAGNOSTICS = ()
TOLERANCES = {}  # the README's float32 tolerance (rtol 1e-5, atol 1e-6); mask, index and uint8 exact


def compute(tensors: dict, meta: dict) -> dict:
    video = tensors["video"]  # (B, 3, T, H, W) in [0, 1]
    assert int(meta["crop_size"]) == video.shape[-1] == video.shape[-2], "FAME's crop size is H = W"
    steps = fame_steps(video, beta=float(meta["beta"]))
    fused = merge(video, steps["mask"], tensors["perm"])
    return {"im_diff": steps["im_diff"], "motion_mask": steps["motion_mask"], "refine_mask": steps["refine_mask"],
            "seg_score": steps["seg_score"], "mask": steps["mask"], "fused": fused,
            "fused_uint8": (fused * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1),
            "derived_hsv_mean_frame": steps["hsv"], "derived_color_coords": steps["colour_coords"],
            "derived_color_index": steps["colour_index"]}
