"""CoCLR's co-training loss (TengdaHan/CoCLR model/pretrain.py `CoCLR.forward` and main_coclr.py
`multi_nce_loss` with the self-masking of train_one_epoch): mmvssl.methods.coclr's coclr_logits,
mine_positives (same-video entries positive and kept out of the top-k), drop_self,
multi_positive_nce and enqueue_rows on the stored features. The case stores queues as (D, K)
columns; mmvssl keeps them as (K, D) rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmvssl.methods.coclr import (coclr_logits, drop_self, enqueue_rows, mine_positives, multi_positive_nce,
                                  same_video_mask)
from tests.parity.margins import assert_margin, dot_error, topk_cut_gaps

INPUTS = ("q_raw", "k_raw", "kf_raw", "q", "k", "kf", "queue", "queue_second", "queue_vname", "k_vsource")
OUTPUTS = ("logits", "mask", "mask_drop_self", "mask_same_video", "loss_keep_self", "loss_drop_self",
           "grad_q_keep_self", "grad_q_drop_self", "grad_q_raw_keep_self", "grad_q_raw_drop_self",
           "queue_after", "queue_second_after", "queue_vname_after")
TOLERANCES = {"logits": {"atol": 1e-5}}  # the README's suggestion: logits are of order 1 / T


def compute(t: dict, meta: dict) -> dict:
    tau, topk = float(meta["temperature"]), int(meta["topk"])
    queue, second = t["queue"].T.contiguous(), t["queue_second"].T.contiguous()  # (K, D)
    queue_video = t["queue_vname"].clone()
    same_video = same_video_mask(t["k_vsource"], queue_video)
    full = bool((queue_video != -1).all())  # the case's queue is full (README): mining is on
    mask = mine_positives(t["kf"], second, topk, same_video, queue_full=full)
    # `mask` is compared exactly (mask_same_video and queue_vname_after are integer comparisons, exact
    # anywhere): the top-k of each row of kf . queue_second must be clear of float error. Both scores
    # at the cut are dot products of unit vectors of dim D, each of which two kernels may compute
    # up to 2 D U apart (margins.dot_error: 3.8e-6 at D = 16; the cases' smallest gap is 2.7e-3)
    if full and topk > 0:
        ranking = (t["kf"] @ second.T).masked_fill(same_video, float("-inf"))  # (B, K): what mine_positives ranks
        assert_margin(topk_cut_gaps(ranking, topk), 2 * dot_error(t["kf"].shape[1]),
                      f"coclr mask: the cut after the top {topk} of kf . queue_second")
    out = {"mask": mask, "mask_drop_self": drop_self(mask), "mask_same_video": same_video,
           "logits": coclr_logits(t["q"], t["k"], queue, tau).detach()}
    for name, positives in (("keep_self", out["mask"]), ("drop_self", out["mask_drop_self"])):
        q = t["q"].clone().requires_grad_()
        loss = multi_positive_nce(coclr_logits(q, t["k"], queue, tau), positives)
        loss.backward()
        q_raw = t["q_raw"].clone().requires_grad_()  # the encoder's output, normalised as the model's head does
        multi_positive_nce(coclr_logits(F.normalize(q_raw, dim=1), t["k"], queue, tau), positives).backward()
        out.update({f"loss_{name}": loss.detach(), f"grad_q_{name}": q.grad, f"grad_q_raw_{name}": q_raw.grad})
    ptr = enqueue_rows([queue, second, queue_video], [t["k"], t["kf"], t["k_vsource"]], int(meta["queue_ptr_before"]))
    assert ptr == (int(meta["queue_ptr_before"]) + t["k"].shape[0]) % queue.shape[0]
    out.update({"queue_after": queue.T, "queue_second_after": second.T, "queue_vname_after": queue_video})
    return out
