"""MSCL (megvii-research/MSCL, README-motion.md section 2): the flow rotation (NormFlowWithStidedAug,
NormFlowWithAug, norm_flow) and the local frame-level loss (MSCLWithAugPosHeadV2) through
mmvssl.methods.mscl's own functions, with the loss's gradients by autograd."""

from __future__ import annotations

import torch

from mmvssl.evaluation.accuracy import topk_correct
from mmvssl.evaluation.metrics import TIE_TOLERANCE
from mmvssl.methods.mscl import local_motion_loss, norm_flow, rotate_flow, rotation_angle
from tests.parity.margins import assert_margin

INPUTS = ("flow_in", "cid", "beta_uniform", "rgb_feat", "flow_feat", "aug_flow_feat")
OUTPUTS = ("flow_norm", "flow_rot_norm", "beta", "flow_rot_norm_uniform", "pos_scores", "pos_labels", "loss_pos",
           "top1_acc_pos", "top5_acc_pos", "grad_rgb_feat", "grad_flow_feat", "grad_aug_flow_feat")
DIAGNOSTICS = ("derived_flow_rot_raw",)  # the generator's rotated flow before norm_flow (reproduced too)
TOLERANCES = {"pos_scores": {"atol": 1e-5}}  # logits divided by T = 0.07 (README-motion: agree to 2.3e-6)

FLOW_DIM, FRAME_DIMS = -1, (1, 2)  # the official (T, H, W, 2) layout: vectors last, a frame's pixels on H, W


def compute(tensors: dict, meta: dict) -> dict:
    flow = tensors["flow_in"]  # (T, H, W, 2)
    num_chunks, ratios = int(meta["num_chunks"]), tuple(float(r) for r in meta["ratios"].strip("()").split(","))
    beta = rotation_angle(int(tensors["cid"]), num_chunks, ratios)
    rotated = rotate_flow(flow, beta, dim=FLOW_DIM)
    out = {"beta": torch.tensor(beta, dtype=torch.float64), "derived_flow_rot_raw": rotated,
           "flow_norm": norm_flow(flow, FLOW_DIM, FRAME_DIMS),
           "flow_rot_norm": norm_flow(rotated, FLOW_DIM, FRAME_DIMS),
           "flow_rot_norm_uniform": norm_flow(rotate_flow(flow, float(tensors["beta_uniform"]), dim=FLOW_DIM),
                                              FLOW_DIM, FRAME_DIMS)}
    feats = {k: tensors[k].clone().requires_grad_(True) for k in ("rgb_feat", "flow_feat", "aug_flow_feat")}
    scores, labels, loss = local_motion_loss(feats["rgb_feat"], feats["flow_feat"], feats["aug_flow_feat"],
                                             float(meta["temperature"]))
    grads = torch.autograd.grad(loss, list(feats.values()))
    # the accuracies count rows whose label is among the k best scores: float decisions compared to
    # the official fractions as if exact (pos_labels is arange, cid a stored input: no float in them).
    # Every other score must be clear of the label's by more than the error this test grants
    # pos_scores (twice its tolerance: both scores may move) plus topk_correct's TIE_TOLERANCE (it
    # counts scores that close as ahead of the label); the cases' smallest distance is 0.22
    tol = TOLERANCES["pos_scores"]["atol"] + 1e-5 * float(scores.detach().abs().max())  # atol + the default rtol
    gaps = (scores.detach() - scores.detach().gather(1, labels[:, None])).abs()  # (b t, 2t)
    others = torch.ones_like(gaps, dtype=torch.bool).scatter_(1, labels[:, None], False)
    assert_margin(gaps[others], TIE_TOLERANCE + 2 * tol, "mscl top1/top5_acc_pos: the label's score against the others")
    out.update({"pos_scores": scores, "pos_labels": labels, "loss_pos": loss,
                "top1_acc_pos": topk_correct(scores, labels, 1).double().mean(),
                "top5_acc_pos": topk_correct(scores, labels, 5).double().mean()})
    out.update({f"grad_{k}": g for k, g in zip(feats, grads)})
    return out
