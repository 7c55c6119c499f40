"""DINO's loss as SVT uses it (kahnchana/svt train_ssl.py DINOLoss, two_token=False, 2 global crops):
mmvssl.methods.svt's dino_loss, teacher_temperature_schedule and update_center on the stored
outputs. The case stores views view-major ([v * B + b]); mmvssl's methods hold them as (B, V, K)."""

from __future__ import annotations

import pytest
import torch

from mmvssl.methods.svt import dino_loss, teacher_temperature_schedule, update_center

INPUTS = ("student_output", "teacher_output", "center_before")
OUTPUTS = ("loss", "grad_student_output", "center_after")
TOLERANCES = {}


def _by_sample(x: torch.Tensor, views: int) -> torch.Tensor:
    """(V * B, K) view-major -> (B, V, K)."""
    return x.view(views, -1, x.shape[-1]).transpose(0, 1)


def compute(t: dict, meta: dict) -> dict:
    ncrops, globals_ = int(meta["ncrops"]), int(meta["global_crops"])
    tau_t = teacher_temperature_schedule(float(meta["warmup_teacher_temp"]), float(meta["teacher_temp"]),
                                         int(meta["warmup_teacher_temp_epochs"]), int(meta["epoch"]))
    assert tau_t == pytest.approx(float(meta["effective_teacher_temp"]), rel=1e-12), "teacher temperature schedule"
    student = t["student_output"].clone().requires_grad_()
    teacher = _by_sample(t["teacher_output"], globals_)  # (B, 2, K)
    center = t["center_before"][0]  # (K,): the buffer mmvssl keeps
    loss = dino_loss(_by_sample(student, ncrops), teacher, center, float(meta["student_temp"]), tau_t)
    loss.backward()
    after = update_center(t["center_before"], teacher, float(meta["center_momentum"]))
    return {"loss": loss.detach(), "grad_student_output": student.grad, "center_after": after}
