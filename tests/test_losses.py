import math

import pytest
import torch
import torch.nn.functional as F

from mmvssl.errors import ConfigError
from mmvssl.losses.contrastive import mil_nce_loss, nce_loss
from mmvssl.losses.objective import Objective


def _nce_by_hand(a, b, t):
    n = len(a)
    dot = lambda x, y: sum(p * q for p, q in zip(x, y)) / t  # noqa: E731
    total = 0.0
    for i in range(n):
        ab = -math.log(math.exp(dot(a[i], b[i])) / sum(math.exp(dot(a[i], b[j])) for j in range(n)))
        ba = -math.log(math.exp(dot(b[i], a[i])) / sum(math.exp(dot(b[i], a[j])) for j in range(n)))
        total += 0.5 * (ab + ba)
    return total / n


def _milnce_by_hand(v, texts, t):
    """texts[i] is the list of candidate vectors of clip i."""
    dot = lambda x, y: sum(p * q for p, q in zip(x, y)) / t  # noqa: E731
    total = 0.0
    for i in range(len(v)):
        pos = sum(math.exp(dot(v[i], c)) for c in texts[i])
        neg = sum(math.exp(dot(v[i], c)) for j in range(len(v)) if j != i for c in texts[j])
        neg += sum(math.exp(dot(v[j], c)) for j in range(len(v)) if j != i for c in texts[i])
        total += -math.log(pos / (pos + neg))
    return total / len(v)


def test_nce_matches_hand_computation():
    a = F.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0], [-0.5, 0.5]]), dim=-1)
    b = F.normalize(torch.tensor([[0.9, 0.1], [0.3, 0.8], [0.2, -1.0]]), dim=-1)
    got = nce_loss(a, b, temperature=0.1).item()
    assert got == pytest.approx(_nce_by_hand(a.tolist(), b.tolist(), 0.1), rel=1e-5)


def test_nce_equals_open_clip_cliploss():
    from open_clip.loss import ClipLoss
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    reference = ClipLoss()(a, b, logit_scale=torch.tensor(1 / 0.07))
    assert nce_loss(a, b, 0.07).item() == pytest.approx(reference.item(), rel=1e-5)


def test_mil_nce_matches_hand_computation():
    torch.manual_seed(1)
    v = F.normalize(torch.randn(3, 4), dim=-1)
    t = F.normalize(torch.randn(3, 2, 4), dim=-1)
    got = mil_nce_loss(v, t, temperature=0.2).item()
    expected = _milnce_by_hand(v.tolist(), [row.tolist() for row in t], 0.2)
    assert got == pytest.approx(expected, rel=1e-5)


def test_mil_nce_candidate_mask_drops_candidates():
    torch.manual_seed(2)
    v = F.normalize(torch.randn(3, 4), dim=-1)
    t = F.normalize(torch.randn(3, 2, 4), dim=-1)
    mask = torch.tensor([[True, False], [True, True], [True, False]])
    got = mil_nce_loss(v, t, 0.2, candidate_mask=mask).item()
    texts = [[t[0, 0].tolist()], [t[1, 0].tolist(), t[1, 1].tolist()], [t[2, 0].tolist()]]
    assert got == pytest.approx(_milnce_by_hand(v.tolist(), texts, 0.2), rel=1e-5)


def test_sample_mask_removes_sample_from_loss():
    torch.manual_seed(3)
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    keep = torch.tensor([True, True, False, True, False])
    assert nce_loss(a, b, 0.07, mask=keep).item() == pytest.approx(nce_loss(a[keep], b[keep], 0.07).item(), rel=1e-5)
    t = F.normalize(torch.randn(5, 2, 8), dim=-1)
    assert mil_nce_loss(a, t, 0.07, mask=keep).item() == pytest.approx(
        mil_nce_loss(a[keep], t[keep], 0.07).item(), rel=1e-5)


def test_aligned_embeddings_have_lower_loss_than_shuffled():
    torch.manual_seed(4)
    a = F.normalize(torch.randn(16, 32), dim=-1)
    b = F.normalize(a + 0.1 * torch.randn(16, 32), dim=-1)
    perm = torch.roll(torch.arange(16), 1)
    assert nce_loss(a, b).item() < nce_loss(a, b[perm]).item()
    texts = torch.stack([b, F.normalize(b + 0.1 * torch.randn(16, 32), dim=-1)], dim=1)
    assert mil_nce_loss(a, texts).item() < mil_nce_loss(a, texts[perm]).item()


def test_optimising_the_loss_lowers_it():
    torch.manual_seed(5)
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, 16, requires_grad=True)
    opt = torch.optim.SGD([a, b], lr=0.5)
    first = None
    for _ in range(30):
        loss = nce_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), 0.1)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_objective_weights_terms_and_applies_masks():
    torch.manual_seed(6)
    emb = {"video_va": F.normalize(torch.randn(4, 8), dim=-1), "audio_va": F.normalize(torch.randn(4, 8), dim=-1),
           "video_vat": F.normalize(torch.randn(4, 6), dim=-1), "text_vat": F.normalize(torch.randn(4, 2, 6), dim=-1)}
    batch = {"has_audio": torch.tensor([True, True, False, True]), "has_text": torch.ones(4, dtype=torch.bool),
             "has_video": torch.ones(4, dtype=torch.bool), "text_mask": torch.ones(4, 2, dtype=torch.bool)}
    obj = Objective([{"name": "va", "loss": "nce", "inputs": ["video_va", "audio_va"], "weight": 2.0},
                     {"name": "vt", "loss": "mil_nce", "inputs": ["video_vat", "text_vat"], "weight": 0.5},
                     {"name": "off", "loss": "nce", "inputs": ["video_va", "audio_va"], "weight": 0.0}], 0.07)
    total, terms = obj(emb, batch)
    assert set(terms) == {"va", "vt"}
    keep = batch["has_audio"]
    assert terms["va"].item() == pytest.approx(nce_loss(emb["video_va"][keep], emb["audio_va"][keep]).item(), rel=1e-5)
    assert total.item() == pytest.approx(2.0 * terms["va"].item() + 0.5 * terms["vt"].item(), rel=1e-6)


def test_objective_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown loss 'ncee'"):
        Objective([{"name": "x", "loss": "ncee", "inputs": ["a_va", "b_va"]}])
    obj = Objective([{"name": "x", "loss": "nce", "inputs": ["video_va", "audio_va"]}])
    with pytest.raises(ConfigError, match="needs embedding 'audio_va'"):
        obj({"video_va": torch.randn(2, 4)}, {})


def _ntxent_by_hand(a, b, t):
    """SimCLR: each of the 2N views against its pair and the other 2N - 2 views."""
    dot = lambda x, y: sum(p * q for p, q in zip(x, y)) / t  # noqa: E731
    views = a + b
    n, total = len(a), 0.0
    for i, anchor in enumerate(views):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(dot(anchor, views[j])) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(dot(anchor, views[pos])) / denom)
    return total / (2 * n)


def _siglip_by_hand(a, b, t, bias):
    dot = lambda x, y: sum(p * q for p, q in zip(x, y)) / t  # noqa: E731
    total = 0.0
    for i in range(len(a)):
        for j in range(len(b)):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (dot(a[i], b[j]) + bias)))
    return total / len(a)


def test_nt_xent_matches_hand_computation_and_masks():
    from mmvssl.losses.contrastive import nt_xent_loss
    torch.manual_seed(7)
    a, b = F.normalize(torch.randn(4, 5), dim=-1), F.normalize(torch.randn(4, 5), dim=-1)
    assert nt_xent_loss(a, b, 0.2).item() == pytest.approx(_ntxent_by_hand(a.tolist(), b.tolist(), 0.2), rel=1e-5)
    keep = torch.tensor([True, False, True, True])
    assert nt_xent_loss(a, b, 0.2, mask=keep).item() == pytest.approx(nt_xent_loss(a[keep], b[keep], 0.2).item(), rel=1e-5)


def test_siglip_matches_hand_computation_open_clip_and_masks():
    from open_clip.loss import SigLipLoss

    from mmvssl.losses.contrastive import siglip_loss
    torch.manual_seed(8)
    a, b = F.normalize(torch.randn(5, 6), dim=-1), F.normalize(torch.randn(5, 6), dim=-1)
    got = siglip_loss(a, b, temperature=0.1, bias=-3.0).item()
    assert got == pytest.approx(_siglip_by_hand(a.tolist(), b.tolist(), 0.1, -3.0), rel=1e-5)
    reference = SigLipLoss()(a, b, logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-3.0))
    assert got == pytest.approx(reference.item(), rel=1e-5)
    keep = torch.tensor([True, True, False, True, False])
    assert siglip_loss(a, b, 0.1, -3.0, mask=keep).item() == pytest.approx(
        siglip_loss(a[keep], b[keep], 0.1, -3.0).item(), rel=1e-5)


def test_learnable_temperature_is_a_clamped_parameter_without_weight_decay():
    import mmvssl
    from mmvssl.train.optim import build_optimizer
    torch.manual_seed(9)
    obj = Objective([{"name": "va", "loss": "nce", "inputs": ["video_va", "audio_va"]},
                     {"name": "vs", "loss": "siglip", "inputs": ["video_va", "audio_va"], "temperature": 0.1},
                     {"name": "fixed", "loss": "nce", "inputs": ["video_va", "audio_va"], "learnable": False}],
                    temperature=0.07, learnable_temperature=True, min_temperature=0.05, max_temperature=1.0)
    assert sorted(n for n, _ in obj.named_parameters()) == ["bias.vs", "log_temperature.va", "log_temperature.vs"]
    emb = {"video_va": F.normalize(torch.randn(6, 8), dim=-1), "audio_va": F.normalize(torch.randn(6, 8), dim=-1)}
    total, terms = obj(emb, {})
    assert terms["va"].item() == pytest.approx(nce_loss(emb["video_va"], emb["audio_va"], 0.07).item(), rel=1e-5)
    total.backward()
    assert obj.log_temperature["va"].grad.abs() > 0 and obj.bias["vs"].grad.abs() > 0
    with torch.no_grad():
        obj.log_temperature["va"].fill_(math.log(0.001))  # below the clamp
    assert obj.temperatures()["temperature/va"] == pytest.approx(0.05)
    model = mmvssl.create_model("vatt-tiny")
    opt = build_optimizer(model, 1e-3, 0.1, no_decay_modules=(obj,))
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[1]["weight_decay"] == 0.0 and all(id(p) in no_decay for p in obj.parameters())
    with pytest.raises(ConfigError, match="temperature 0.001 is outside"):
        Objective([{"name": "x", "loss": "nce", "inputs": ["a_va", "b_va"], "temperature": 0.001}])


# --- LaViLa's SSLCLIPLoss (its official numbers: tests/parity/lavila.py) ---------------------------------

def test_ssl_clip_without_pseudo_pairs_is_clip_and_pseudo_pairs_take_the_pseudo_scale():
    from mmvssl.losses.contrastive import ssl_clip_loss, ssl_clip_scales
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    assert ssl_clip_loss(a, b, 0.07, pseudo_temperature=0.2).item() == pytest.approx(nce_loss(a, b, 0.07).item(), rel=1e-6)
    everyone_pseudo = torch.zeros(5, dtype=torch.bool)
    assert ssl_clip_loss(a, b, 0.07, pseudo_temperature=0.2, ground_truth=everyone_pseudo).item() == pytest.approx(
        nce_loss(a, b, 0.2).item(), rel=1e-6)
    truth = torch.tensor([True, False])
    scales = ssl_clip_scales(truth, truth, 0.05, 0.2)  # scales 20 and 5: mixed pairs at sqrt(100) = 10
    torch.testing.assert_close(scales, torch.tensor([[20.0, 10.0], [10.0, 5.0]]))


def test_objective_ssl_clip_term_owns_a_pseudo_temperature_and_flags_narrator_texts_as_pseudo():
    from mmvssl.losses.contrastive import ssl_clip_loss
    term = {"name": "vt", "loss": "ssl_clip", "inputs": ["video_vat", "text_vat"], "pseudo_temperature": 0.1}
    objective = Objective([term], temperature=0.07, learnable_temperature=True)
    assert "log_pseudo_temperature.vt" in objective.state_dict()  # checkpointed with the method
    torch.manual_seed(1)
    video, text = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 1, 8), dim=-1)
    generated = torch.tensor([False, True, True, False])
    batch = {"text_generated": generated, "text_mask": torch.ones(4, 1, dtype=torch.bool)}
    loss, values = objective({"video_vat": video, "text_vat": text}, batch)
    expected = ssl_clip_loss(video, text[:, 0], 0.07, pseudo_temperature=0.1, ground_truth=~generated)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert objective.log_pseudo_temperature["vt"].grad.abs() > 0  # the pseudo scale learns
    assert objective.temperatures()["pseudo_temperature/vt"] == pytest.approx(0.1, rel=1e-5)
    frozen = Objective([term], temperature=0.07)
    assert not frozen.log_pseudo_temperature["vt"].requires_grad and "log_pseudo_temperature.vt" in frozen.state_dict()
    with pytest.raises(ConfigError, match="ssl_clip pairs each clip with one text"):
        objective({"video_vat": video, "text_vat": text.expand(4, 2, 8)}, batch)
    with pytest.raises(ConfigError, match="pseudo_temperature belongs to an ssl_clip term"):
        Objective([{**term, "loss": "nce"}])
