"""CARL's sequence contrastive loss (minghchen/CARL_code algos/scl.py `SCL.compute_sequence_loss`,
gauss positives, single_noself negatives): mmvssl.methods.carl's sequence_contrastive_loss and
sequence_contrastive_terms on the stored frames, steps, lengths and padding masks."""

from __future__ import annotations

from mmvssl.methods.carl import sequence_contrastive_loss, sequence_contrastive_terms

INPUTS = ("embs", "seq_lens", "steps", "masks")
OUTPUTS = ("loss", "grad_embs")
DIAGNOSTICS = ("kl_input_log_prob", "kl_target_label")
TOLERANCES = {}


def compute(t: dict, meta: dict) -> dict:
    assert meta["positive_type"] == "gauss" and meta["negative_type"] == "single_noself", meta
    variance, tau = float(meta["label_variance"]), float(meta["softmax_temperature"])
    embs = t["embs"].clone().requires_grad_()
    loss = sequence_contrastive_loss(embs, t["steps"], t["seq_lens"], t["masks"], variance, tau)
    loss.backward()
    log_prob, label = sequence_contrastive_terms(t["embs"], t["steps"], t["seq_lens"], t["masks"], variance, tau)
    return {"loss": loss.detach(), "grad_embs": embs.grad, "kl_input_log_prob": log_prob, "kl_target_label": label}
