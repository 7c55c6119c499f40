"""Image-teacher distillation: the tiny open_clip teacher (built from a config, saved to a local
file, loaded through `pretrained=<path>`), the distillation losses against hand computations,
the predictor inside the objective, and a few steps of configs/demo/distill.yaml."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmvssl.config import load_config
from mmvssl.errors import ConfigError
from mmvssl.losses.distill import align_frames, distill_clip, distill_frames
from mmvssl.losses.objective import Objective
from mmvssl.teacher.model import load_teacher
from mmvssl.resources import data_path
from tests.conftest import load_eval_script, read_jsonl

TINY_TEACHER = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> dict:
    """A tiny open_clip ViT: its config as a JSON file and its weights saved to a local file."""
    import open_clip
    root = tmp_path_factory.mktemp("teacher")
    arch = root / "mmvssl-tiny-teacher.json"
    arch.write_text(json.dumps(TINY_TEACHER))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    model = open_clip.create_model("mmvssl-tiny-teacher")
    weights = root / "tiny_teacher.pt"
    torch.save(model.state_dict(), weights)
    return {"arch": str(arch), "pretrained": str(weights), "model": model.eval()}


def test_local_checkpoint_reproduces_the_saved_model(tiny_teacher):
    teacher = load_teacher(tiny_teacher["arch"], tiny_teacher["pretrained"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = tiny_teacher["model"].encode_image(images)
        got, _ = teacher._encode(images)
    torch.testing.assert_close(got, expected)
    assert teacher.embed_dim == 16


def test_teacher_converts_mmvssl_frames_and_stays_frozen(tiny_teacher):
    teacher = load_teacher(tiny_teacher["arch"], tiny_teacher["pretrained"], image_size=32, patch_tokens=True)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    video = torch.randn(2, 3, 4, 32, 32, requires_grad=True)  # mmvssl-normalised (B, C, T, H, W)
    out = teacher(video)
    assert out["teacher_frames"].shape == (2, 4, 16)
    assert out["teacher_patches"].shape == (2, 4, 16, 32)  # (32 / 8)^2 patches of width 32
    assert not out["teacher_frames"].requires_grad
    # frame (b, t) by hand: undo mmvssl's normalisation, apply the teacher's (OpenAI CLIP) mean / std
    frame = video[1, :, 2].detach() * 0.225 + 0.45
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    with torch.no_grad():
        expected = tiny_teacher["model"].encode_image(((frame - mean) / std)[None])[0]
    torch.testing.assert_close(out["teacher_frames"][1, 2], expected, rtol=1e-4, atol=1e-5)
    assert teacher(torch.randn(1, 3, 2, 48, 40))["teacher_frames"].shape == (1, 2, 16)  # resized to 32


def test_missing_checkpoint_and_config_are_named(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="teacher.pretrained.*nope.pt"):
        load_teacher(tiny_teacher["arch"], str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="teacher.arch.*missing.json"):
        load_teacher(str(tmp_path / "missing.json"))


def test_distill_frames_matches_a_hand_computation():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (B=1, t=2, D=2)
    teacher = torch.tensor([[[1.0, 1.0], [1.0, -1.0], [0.0, 3.0], [0.0, 1.0]]])  # (B=1, T=4, D=2)
    # positions average frame pairs: [1, 0] and [0, 2] -> cosines 1 and 1 -> loss 0
    assert torch.allclose(align_frames(teacher, 2), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]))
    assert distill_frames(pred, teacher).item() == pytest.approx(0.0, abs=1e-6)
    pred2 = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])  # cosines 1/sqrt(2) and 0
    assert distill_frames(pred2, teacher).item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 1) / 2, rel=1e-6)
    # masked samples are left out of the mean
    both = torch.cat([pred, pred2]), torch.cat([teacher, teacher])
    assert distill_frames(*both, mask=torch.tensor([True, False])).item() == pytest.approx(0.0, abs=1e-6)
    # smooth L1 regresses the layer-normed target
    target = F.layer_norm(align_frames(teacher, 2), (2,))
    expected = F.smooth_l1_loss(pred2, target)
    assert distill_frames(pred2, teacher, distance="smooth_l1").item() == pytest.approx(expected.item(), rel=1e-6)


def test_distill_clip_matches_the_mean_teacher_embedding():
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # mean [1, 1]
    assert distill_clip(torch.tensor([[3.0, 3.0]]), teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_clip(torch.tensor([[1.0, 0.0]]), teacher).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)


def test_objective_predictor_learns_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    terms = [{"name": "frame_distill", "loss": "distill_frames", "inputs": ["video_frames", "teacher_frames"]},
             {"name": "clip_distill", "loss": "distill_clip", "inputs": ["video_vat", "teacher_frames"],
              "distance": "smooth_l1", "weight": 0.5}]
    objective = Objective(terms, feature_dims={"video_frames": 8, "video_vat": 6, "teacher_frames": 5})
    assert objective.modalities == {"video"}
    student = {"video_frames": torch.randn(4, 2, 8), "video_vat": torch.randn(4, 6)}
    teacher = torch.randn(4, 4, 5, requires_grad=True)
    batch = {"teacher_frames": teacher, "has_video": torch.ones(4, dtype=torch.bool)}
    opt = torch.optim.Adam(objective.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, values = objective(student, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert teacher.grad is None
    assert set(values) == {"frame_distill", "clip_distill"}
    assert loss.item() < 0.5 * first
    with pytest.raises(ConfigError, match="teacher_frames"):
        Objective(terms[:1], feature_dims={"video_frames": 8})
    with pytest.raises(ConfigError, match="distance"):
        Objective([{**terms[0], "distance": "l3"}], feature_dims={"video_frames": 8, "teacher_frames": 5})


def test_model_gives_per_frame_student_tokens():
    import mmvssl
    net = mmvssl.create_model("vatt-tiny")
    net.frame_features = True
    net.eval()
    out = net({"video": torch.randn(2, 3, 8, 64, 64)})
    t = 8 // net.encoders["video"].patch[0]
    assert out["video_frames"].shape == (2, t, net.encoders["video"].width)
    assert net.output_dims()["video_frames"] == net.encoders["video"].width


def test_demo_distill_config_trains_with_a_local_teacher(tiny_teacher, demo_shards, tmp_path):
    from mmvssl.train.engine import pretrain
    cfg = load_config(data_path("configs", "demo", "distill.yaml"), [
        f"data.shards={demo_shards['train']}", "data.batch_size=4", "data.num_workers=0",
        "train.max_steps=2", "train.log_every=1", "train.save_every=0", "train.warmup_steps=1",
        "train.log_with=none", f"train.output_dir={tmp_path / 'run'}",
        f"teacher.arch={tiny_teacher['arch']}", f"teacher.pretrained={tiny_teacher['pretrained']}"])
    final = pretrain(cfg)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["frame_distill"]) and math.isfinite(r["clip_distill"])
        # the logged total is the config's weighted sum of its four terms
        assert [t.name for t in cfg.objective.terms] == ["va_nce", "vt_milnce", "frame_distill", "clip_distill"]
        assert r["loss"] == pytest.approx(sum(t.weight * r[t.name] for t in cfg.objective.terms), rel=1e-5)
    assert (final / "model.safetensors").is_file()


def test_frame_means_follow_the_kept_tokens_under_droptoken():
    from mmvssl.models.encoders import _frame_means
    tokens = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])  # (B=1, N=4, D=1)
    position = torch.tensor([[0, 0, 2, 0]])  # position 1 lost every token
    frames = _frame_means(tokens, position, 3)
    assert frames.flatten().tolist() == [pytest.approx(11 / 3), 0.0, 5.0]


def test_clip_initialisation_inflates_patches_and_copies_blocks(tiny_teacher):
    import mmvssl
    from mmvssl.models.clip_init import init_from_clip
    net = mmvssl.create_model("vatt-tiny", **{"video.width": 32, "video.depth": 1, "video.heads": 2,
                                              "video.patch": [2, 8, 8]})
    done = init_from_clip(net, tiny_teacher["arch"], tiny_teacher["pretrained"])
    assert {"video.patch_embed", "video.agg_token", "video.blocks.0", "video.norm"} <= set(done)
    visual, enc = tiny_teacher["model"].visual, net.encoders["video"]
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        static = enc.patch_embed(image[:, :, None].expand(-1, -1, 4, -1, -1))  # (1, D, t=2, 4, 4)
        flat = visual.conv1(image)  # (1, D, 4, 4)
    torch.testing.assert_close(static[:, :, 1], flat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc.transformer.blocks[0].attn.qkv.weight, visual.transformer.resblocks[0].attn.in_proj_weight)
    torch.testing.assert_close(enc.transformer.blocks[0].mlp[2].bias, visual.transformer.resblocks[0].mlp.c_proj.bias)
    wide = mmvssl.create_model("vatt-tiny")
    with pytest.raises(ConfigError, match="video.width"):
        init_from_clip(wide, tiny_teacher["arch"], tiny_teacher["pretrained"])


def test_the_evidence_scripts_distillation_only_student_keeps_just_the_teacher_terms():
    from mmvssl.losses.distill import DISTILL_LOSSES
    script = load_eval_script("distill_evidence")
    full = load_config(data_path("configs", "demo", "distill.yaml")).objective.terms
    only = load_config(data_path("configs", "demo", "distill.yaml"),
                       [script.distill_terms_only("distill.yaml")]).objective.terms
    assert [t.name for t in only] == [t.name for t in full if t.loss in DISTILL_LOSSES] == ["frame_distill", "clip_distill"]
    assert [t.weight for t in only] == [t.weight for t in full if t.loss in DISTILL_LOSSES]
    assert len(full) > len(only)
