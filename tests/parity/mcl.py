"""MCL (YihengZhang-CV/MCL-Motion-Focused-Contrastive-Learning, README-motion.md section 3): the
Grad-CAM of the positive similarity l_pos and the three alignment losses of MAL through
mmvssl.methods.mcl's own functions, on the case's stand-in network (a 1x1x1 convolution and
MLP_Head, built here from the stored weights); second-order gradients by autograd. Every output is a
float compared with a tolerance: no argmax, top-k or rounding decides any of them (Grad-CAM's ReLU
is continuous), so there is no near-tie to guard (issue 28)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmvssl.methods.mcl import grad_cam, motion_alignment, positive_gradient, positive_similarity

WEIGHTS = ("proj_conv_weight", "proj_conv_bias", "head_fc0_weight", "head_fc0_bias", "head_fc2_weight",
           "head_fc2_bias")
INPUTS = ("xconv", "st_mag", "k_sf", *WEIGHTS)
OUTPUTS = ("q", "l_pos", "gradient", "gradcam_weight", "gradcam", "sim_spa_temp", "sim_spa", "sim_tempo",
           "loss_spa_temp", "loss_spa", "loss_tempo", "loss_mal", "grad_loss_mal_xconv",
           *(f"grad_loss_mal_{w}" for w in WEIGHTS))
# the official MoCo memory bank's logits and loss (MemoryMCL with inter=True, three keys per clip):
# mmvssl's MCL contrasts in-batch with NT-Xent instead (docs/methods.md, mcl), so nothing of it runs here
DIAGNOSTICS = ("k_df1", "k_df2", "memory_init", "out_inter", "loss_nce_inter")


def compute(tensors: dict, meta: dict) -> dict:
    leaves = {k: tensors[k].clone().requires_grad_(True) for k in ("xconv", *WEIGHTS)}
    w = leaves
    # the stand-in encoder of the case (not official, not mmvssl's): conv, ReLU, mean, MLP_Head, normalise
    pooled = F.relu(F.conv3d(w["xconv"], w["proj_conv_weight"], w["proj_conv_bias"])).mean(dim=(2, 3, 4))
    hidden = F.relu(F.linear(pooled, w["head_fc0_weight"], w["head_fc0_bias"]))
    q = F.normalize(F.linear(hidden, w["head_fc2_weight"], w["head_fc2_bias"]), dim=1)
    l_pos = positive_similarity(q, tensors["k_sf"])
    gradient = positive_gradient(l_pos, w["xconv"])
    weight, cam = grad_cam(gradient)
    out = {"q": q, "l_pos": l_pos, "gradient": gradient, "gradcam_weight": weight, "gradcam": cam,
           **motion_alignment(cam, tensors["st_mag"])}
    grads = torch.autograd.grad(out["loss_mal"], list(leaves.values()))
    out.update({f"grad_loss_mal_{k}": g for k, g in zip(leaves, grads)})
    return out
