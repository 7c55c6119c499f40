"""TG (lambert-x/video-semisup): the uint8 temporal gradient between consecutive raw frames, its
normalisation and layout, the RGB-TG contrastive term and the per-stage alignment, run through
mmvssl.methods.tg on the official cases (README-motion.md, section 4)."""

from __future__ import annotations

import ast

import torch

from mmvssl.methods.tg import crossview_contrast_loss, feature_alignment_loss, normalise_frames, temporal_gradient_uint8

# the frame indices are the official SampleFrames_Custom draw (mmvssl samples by time, not by index)
INPUTS = ("frames_rgb", "frame_inds_1based", "emb_rgb", "emb_tg")
OUTPUTS = ("tg_offline_bgr_prejpeg", "imgs_sampled_rgb", "tg_sampled_rgb", "tg_normalized_nhwc", "tg_input_ncthw",
           "loss_crossview_sameclip", "loss_simclr_rgb_to_tg", "loss_simclr_tg_to_rgb")
_STAGE_IN, _STAGE_OUT = ("align_rgb_feat_l{}", "align_tg_feat_l{}"), ("loss_align_l{}", "grad_align_rgb_feat_l{}")
INPUTS += tuple(k.format(0) for k in _STAGE_IN)
OUTPUTS += tuple(k.format(0) for k in _STAGE_OUT)
# stage 1 is in case_1 only: named here so that case_2 does not miss it; compute() returns it and the
# parity test compares it like any output (every returned key the case holds is compared)
DIAGNOSTICS = tuple(k.format(1) for k in _STAGE_IN + _STAGE_OUT)
TOLERANCES = {}  # float32: the README's rtol 1e-5 / atol 1e-6; uint8 maps exact


def _stages(tensors: dict) -> list[int]:
    """The stages whose features the case holds (0, or 0 and 1)."""
    return sorted(int(k[len("align_rgb_feat_l"):]) for k in tensors if k.startswith("align_rgb_feat_l"))


def compute(tensors: dict, meta: dict) -> dict:
    frames, inds = tensors["frames_rgb"], tensors["frame_inds_1based"] - 1  # (N, H, W, 3) uint8; 0-based
    norm = ast.literal_eval(meta["img_norm_cfg"])
    # offline: tempgrad_{i} from img_{i}, img_{i+1}, written by OpenCV in BGR order
    offline = temporal_gradient_uint8(frames[:-1], frames[1:]).flip(-1)
    # the uint8 maps are compared exactly, and are exact on any CPU: frame - next + 255 is an integer
    # in [0, 510] and its half a multiple of .5, both exact in float32, and the cast truncates; no
    # rounding anywhere, so no near-tie (issue 28): the float path is integer arithmetic
    assert torch.equal(offline.flip(-1).long(), (frames[:-1].long() - frames[1:].long() + 255) // 2)
    sampled = frames[inds]  # (T, H, W, 3)
    tg = temporal_gradient_uint8(sampled, frames[inds + 1])  # the next raw frame, not the next sampled one
    normalised = normalise_frames(tg, norm["mean"], norm["std"], channel_dim=-1)  # (T, H, W, 3)
    loss, ab, ba = crossview_contrast_loss(tensors["emb_rgb"], tensors["emb_tg"],
                                           float(meta["simclr_temperature"]), float(meta["simclr_loss_weight"]))
    out = {"tg_offline_bgr_prejpeg": offline, "imgs_sampled_rgb": sampled, "tg_sampled_rgb": tg,
           "tg_normalized_nhwc": normalised, "tg_input_ncthw": normalised.permute(3, 0, 1, 2)[None],
           "loss_crossview_sameclip": float(meta["contrast_loss_weight"]) * loss,
           "loss_simclr_rgb_to_tg": ab, "loss_simclr_tg_to_rgb": ba}
    for i in _stages(tensors):
        rgb = tensors[f"align_rgb_feat_l{i}"].clone().requires_grad_(True)
        tg_feat = tensors[f"align_tg_feat_l{i}"].clone().requires_grad_(True)
        align = feature_alignment_loss(rgb, tg_feat)
        align.backward()
        assert tg_feat.grad is None, "the TG features are detached"
        out[f"loss_align_l{i}"], out[f"grad_align_rgb_feat_l{i}"] = align.detach(), rgb.grad
    return out
