"""The mechanism that defines a method, checked against its official code's formula by hand (issue 24,
Done-when 4), for the methods whose defining part had no such test beside "the loss falls": MMV's FAC
projection graph, VATT's AsymmetricNCE with several candidates, CVRL's pair of clips, SimCLR's NT-Xent
as its objective.py sums it, and CSTP's BYOL term. The other methods' mechanism tests live beside
them (tests/test_methods_<name>.py, tests/test_losses.py) and in the parity cases (tests/test_parity.py).

Tiny tensors; expected values computed with plain Python / float64 loops from the formula, compared
within a tolerance that float32 rounding of a few dozen operations cannot reach (rel 1e-5).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REL = 1e-5  # float32 sums of <= 64 terms of size <= 1/0.07: relative rounding well below 1e-5


# --- MMV: the FAC graph of google-deepmind/deepmind-research mmv/models/mm_embeddings.py, mmv/config.py ---

def test_mmv_fac_heads_are_the_released_fac_relu_graph():
    """MMV's released FAC (mm_embedding_graph 'fac_relu', config_video_audio toaud 'mlp@512' with BN after,
    config_video_text totxt 'linear' with BN after, audio tovid / text tovid 'linear'):
      va(video) = BN2(W2 ReLU(BN1(W1 x + b1)) + b2)
      vat(video) = BN3(W3 ReLU(va) + b3)
      va(audio) = Wa a + ba,   vat(text) = Wt t + bt
    with each BN at inference (x - mean) / sqrt(var + eps) * gamma + beta."""
    from mmvssl.models.heads import FACHeads
    torch.manual_seed(0)
    heads = FACHeads(video_width=6, audio_width=5, text_width=4, va_dim=7, vat_dim=3).eval()
    with torch.no_grad():
        for bn in heads.modules():
            if isinstance(bn, torch.nn.BatchNorm1d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
    x, a, t = torch.randn(2, 6), torch.randn(2, 5), torch.randn(2, 4)

    def lin(layer, v):  # float64 by hand
        w, b = layer.weight.double(), layer.bias.double()
        return v.double() @ w.T + b

    def bn(layer, v):
        return ((v - layer.running_mean.double()) / torch.sqrt(layer.running_var.double() + layer.eps)
                * layer.weight.double() + layer.bias.double())

    l1, bn1, _, l2, bn2 = heads.video_to_va
    va = bn(bn2, lin(l2, torch.relu(bn(bn1, lin(l1, x)))))
    _, l3, bn3 = heads.va_to_vat
    vat = bn(bn3, lin(l3, torch.relu(va)))
    out = heads.embed({"video": x, "audio": a, "text": t})
    torch.testing.assert_close(out["video_va"].double(), va, rtol=REL, atol=1e-6)
    torch.testing.assert_close(out["video_vat"].double(), vat, rtol=REL, atol=1e-6)
    torch.testing.assert_close(out["audio_va"].double(), lin(heads.audio_to_va, a), rtol=REL, atol=1e-6)
    torch.testing.assert_close(out["text_vat"].double(), lin(heads.text_to_vat, t), rtol=REL, atol=1e-6)
    # audio reaches vat through the video's va -> vat head (MMV's FAC at evaluation)
    torch.testing.assert_close(heads.project("audio", a, "vat").double(),
                               bn(bn3, lin(l3, torch.relu(lin(heads.audio_to_va, a)))), rtol=REL, atol=1e-6)


# --- VATT: google-research/google-research vatt/utils/train/objectives.py AsymmetricNCE, K candidates ---

def test_vatt_video_text_term_is_the_released_asymmetric_nce_less_its_second_positive():
    """AsymmetricNCE for video i with candidates t_i1..t_iK (scores s = v.t / tau):
      released_i = LSE( {s(v_i, t_jk)}_{j,k} U {s(v_j, t_ik)}_{j,k} ) - LSE_k s(v_i, t_ik)
    where the positives s(v_i, t_ik) appear in both sets. mmvssl's mil_nce keeps them once, so
    mmvssl_i = LSE(row U col without j = i) - LSE_k s(v_i, t_ik), and exactly
      released_i = log(exp(mmvssl_i) + 1)   (the denominator gains exp(LSE_k s(v_i, t_ik)) once more).
    The configs/vatt objective's vt term must equal mean_i log(exp(released_i) - 1)."""
    from omegaconf import OmegaConf

    from mmvssl.config import load_config
    from mmvssl.losses.objective import Objective
    from mmvssl.resources import data_path
    cfg = load_config(data_path("configs", "vatt", "mbs.yaml"))
    terms = [dict(t) for t in OmegaConf.to_container(cfg.objective.terms) if t["name"] == "vt_milnce"]
    assert len(terms) == 1
    tau = float(cfg.objective.temperature)
    g = torch.Generator().manual_seed(3)
    B, K = 3, 2
    v = F.normalize(torch.randn(B, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(B, K, 8, generator=g), dim=-1)
    _, values = Objective(terms, temperature=tau)({"video_vat": v, "text_vat": t},
                                                    {"text_mask": torch.ones(B, K, dtype=torch.bool)})
    vd, td = v.double().tolist(), t.double().tolist()

    def s(i, j, k):
        return sum(x * y for x, y in zip(vd[i], td[j][k])) / tau

    def lse(xs):
        m = max(xs)
        return m + math.log(sum(math.exp(x - m) for x in xs))

    expected = 0.0
    for i in range(B):
        row = [s(i, j, k) for j in range(B) for k in range(K)]
        col_all = [s(j, i, k) for j in range(B) for k in range(K)]  # the released all2local, j = i included
        released = lse(row + col_all) - lse([s(i, i, k) for k in range(K)])
        expected += math.log(math.exp(released) - 1.0) / B
    assert values["vt_milnce"].item() == pytest.approx(expected, rel=REL)


# --- CVRL: tensorflow/models official/projects/video_ssl/ops/video_ssl_preprocess_ops.py sample_ssl_sequence ---

def test_cvrl_pair_draws_the_released_gap_cdf_a_uniform_first_start_and_a_shuffled_order():
    """sample_ssl_sequence: the gap k has CDF F(k) = 2k/m - k^2/m^2 on [0, m] (its `cdf`, power 1; m the
    room for a start), the earlier clip starts uniformly in [0, m - k), the two offsets are shuffled.
    Tolerance: the Dvoretzky-Kiefer-Wolfowitz bound, P(sup |F_n - F| > eps) <= 2 exp(-2 n eps^2): with
    n = 20000 and eps = 0.015 that is 2 exp(-9) = 2.5e-4 (and the seed is fixed)."""
    from mmvssl.data.sampling import cvrl_pair
    rng = random.Random(0)
    duration, window = 10.0, 2.0
    m, n, eps = duration - window, 20000, 0.015
    pairs = np.array([cvrl_pair(duration, window, rng) for _ in range(n)])
    gap = np.abs(pairs[:, 1] - pairs[:, 0])
    first = pairs.min(axis=1)
    grid = np.linspace(0.0, m, 41)
    empirical = (gap[None, :] <= grid[:, None]).mean(axis=1)
    assert np.abs(empirical - (2 * grid / m - grid ** 2 / m ** 2)).max() < eps
    share = first / np.maximum(m - gap, 1e-12)  # uniform on [0, 1] given the gap
    u = np.linspace(0.0, 1.0, 41)
    assert np.abs((share[None, :] <= u[:, None]).mean(axis=1) - u).max() < eps
    # shuffled: the first view is the earlier one half of the time (binomial sd 0.0035; 5 sd)
    assert abs((pairs[:, 0] <= pairs[:, 1]).mean() - 0.5) < 5 * 0.5 / math.sqrt(n)


# --- SimCLR: google-research/simclr objective.py add_contrastive_loss ---

def test_simclr_nt_xent_is_half_the_released_sum_of_both_directions():
    """add_contrastive_loss: logits_ab = a.b^T / tau, logits_aa = a.a^T / tau with the diagonal removed;
      loss_a = mean_i CE(i, [logits_ab[i], logits_aa[i]]), loss_b likewise from b, loss = loss_a + loss_b.
    mmvssl's nt_xent_loss averages the two directions: it must be loss / 2."""
    from mmvssl.losses.contrastive import nt_xent_loss
    g = torch.Generator().manual_seed(5)
    a = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    b = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    tau, B = 0.1, 4
    ad, bd = a.double().tolist(), b.double().tolist()

    def dot(x, y):
        return sum(p * q for p, q in zip(x, y)) / tau

    def side(x, y):
        total = 0.0
        for i in range(B):
            logits = [dot(x[i], y[j]) for j in range(B)] + [dot(x[i], x[j]) for j in range(B) if j != i]
            total += -(logits[i] - math.log(sum(math.exp(z) for z in logits)))
        return total / B
    released = side(ad, bd) + side(bd, ad)
    assert nt_xent_loss(a, b, tau).item() == pytest.approx(released / 2, rel=REL)


# --- CSTP: BYOL (Grill et al. 2020), the contrastive half of KT27-A/CSTP main_byol.py ---

def test_cstp_byol_term_is_the_symmetrised_byol_loss():
    """BYOL: L = ||q_1 / |q_1| - z'_2 / |z'_2| ||^2 = 2 - 2 cos(q_1, z'_2), symmetrised L + L~ with the views
    swapped (KT27-A/CSTP r21d_byol.py _cal_loss: loss_one + loss_two). mmvssl's byol_loss (normalised
    inputs) is the mean over clips of L + L~."""
    from mmvssl.methods.cstp import byol_loss
    g = torch.Generator().manual_seed(6)
    online = F.normalize(torch.randn(3, 2, 5, generator=g), dim=-1)
    target = F.normalize(torch.randn(3, 2, 5, generator=g), dim=-1)
    o, tg = online.double().tolist(), target.double().tolist()
    expected = 0.0
    for i in range(3):
        sq = [sum((p - q) ** 2 for p, q in zip(o[i][v], tg[i][1 - v])) for v in (0, 1)]  # L, L~
        expected += (sq[0] + sq[1]) / 3
    assert byol_loss(online, target).item() == pytest.approx(expected, rel=REL)
