"""The method unit: every config under configs/methods/ trains at tiny size and its loss falls;
each method's distinctive mechanism behaves as its paper specifies; a method's state resumes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmvssl.config import load_config
from mmvssl.errors import ConfigError
from mmvssl.resources import data_path
from tests.conftest import read_jsonl

METHOD_CONFIGS = sorted(p for p in data_path("configs", "methods").glob("*.yaml"))
TINY = ["data.batch_size=8", "data.num_workers=0", "data.num_frames=4", "data.fps=2.0", "data.size=32",
        "data.shuffle_buffer=8", "train.warmup_steps=2", "train.log_every=1", "train.save_every=0",
        "train.log_with=none"]
TINY_MODEL = {  # per preset: the tiny clip (4 frames of 32 px) and, for video-tiny, a narrower head
    "video-tiny": ["model.overrides.video.num_frames=4", "model.overrides.video.image_size=32",
                   "model.overrides.video.patch=[2,8,8]", "model.overrides.heads.hidden=64"],
    "vatt-tiny": ["model.overrides.video.num_frames=4", "model.overrides.video.image_size=32",
                  "model.overrides.video.patch=[2,8,8]"],
    "mmv-tiny": [],
}

# MoCo-style methods: the loss is measured against a queue that starts as random vectors (easy
# negatives) and fills with real keys over the first steps, so it rises by construction within 16
# steps; their own tests optimise the loss against a full queue instead (tests/test_methods_coclr.py)
QUEUE_METHODS = {"coclr"}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> list[str]:
    """Overrides naming a tiny open_clip image teacher saved locally (configs whose teacher would be
    downloaded train against it)."""
    import json

    import open_clip
    from tests.test_distill import TINY_TEACHER
    root = tmp_path_factory.mktemp("teacher")
    arch = root / "mmvssl-methods-teacher.json"
    arch.write_text(json.dumps(TINY_TEACHER))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("mmvssl-methods-teacher").state_dict(), root / "teacher.pt")
    return [f"teacher.arch={arch}", f"teacher.pretrained={root / 'teacher.pt'}"]


def tiny_config(path, shards, out, *extra):
    preset = load_config(path).model.preset
    cfg = load_config(path, [f"data.shards={shards}", f"train.output_dir={out}", *TINY, *TINY_MODEL[preset], *extra])
    if cfg.method.name == "svt":
        cfg.method.options.prototypes = 64
        cfg.data.local_size, cfg.data.local_frames = 16, 2  # smaller local views, as the config's
    return cfg


def test_every_method_config_names_a_known_method_and_validates():
    from mmvssl.methods import MODULES, get_method
    assert METHOD_CONFIGS, "no configs/methods/*.yaml"
    for path in METHOD_CONFIGS:
        cfg = load_config(path)
        method = get_method(cfg.method.name)
        assert cfg.method.name in MODULES and method.paper
        method.options(cfg)  # the method's own options are valid


# configs that read cached optical flow (data.flow) need flow shards: tests/test_methods_motion_flow.py trains them
DEMO_CONFIGS = [p for p in METHOD_CONFIGS if not load_config(p).data.flow]


@pytest.mark.parametrize("path", DEMO_CONFIGS, ids=lambda p: p.stem)
def test_method_config_trains_and_its_loss_falls(path, demo_shards, tmp_path, tiny_teacher):
    from mmvssl.train.engine import pretrain
    steps = 16
    teacher = tiny_teacher if load_config(path).teacher.arch else []
    final = pretrain(tiny_config(path, demo_shards["train"], tmp_path, f"train.max_steps={steps}", "train.lr=2e-3",
                                 *teacher))
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["bad_steps"] == 0
    # DINO's loss is the teacher's entropy (which centring raises early on, by design) plus the KL the
    # student minimises: for it, the KL part must fall
    value = [r["loss"] - r.get("teacher_entropy", 0.0) for r in log]
    first, last = sum(value[:4]) / 4, sum(value[-4:]) / 4
    if load_config(path).method.name not in QUEUE_METHODS:
        assert last < first, f"{path.stem}: loss did not fall ({first:.4f} -> {last:.4f})"
    import mmvssl
    model = mmvssl.load_model(final)  # the student alone ships: no teacher, no prototypes
    assert not any(k.startswith(("teacher", "prototypes")) for k in model.state_dict())


def test_misspelt_method_option_is_one_line_naming_it(demo_shards, tmp_path):
    from mmvssl.train.engine import pretrain
    cfg = tiny_config(data_path("configs", "methods", "simclr.yaml"), demo_shards["train"], tmp_path,
                      "method.options.temprature=0.2")
    with pytest.raises(ConfigError, match=r"method.options.temprature: method 'simclr' has no such option"):
        pretrain(cfg)


def test_unknown_method_lists_the_methods():
    from mmvssl.methods import get_method
    with pytest.raises(ConfigError, match="method.name 'simclrr' is unknown.*simclr"):
        get_method("simclrr")


def test_single_view_sampler_is_refused_by_a_view_method(demo_shards, tmp_path):
    from mmvssl.train.engine import pretrain
    cfg = tiny_config(data_path("configs", "methods", "simclr.yaml"), demo_shards["train"], tmp_path,
                      "data.sampler=random")
    with pytest.raises(ConfigError, match="contrasts views"):
        pretrain(cfg)


def test_config_base_is_merged_under_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("data: {batch_size: 3, fps: 2.0}\ntrain: {lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ndata: {batch_size: 5}\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.lr=0.25"])
    assert (cfg.data.batch_size, cfg.data.fps, cfg.train.lr) == (5, 2.0, 0.25)
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml \(the base of"):
        load_config(tmp_path / "d.yaml")


# --- views --------------------------------------------------------------------------------------------

def test_model_folds_views_into_the_batch_and_returns_them_per_view():
    import mmvssl
    torch.manual_seed(0)
    model = mmvssl.create_model("video-tiny").eval()
    video = torch.randn(3, 2, 3, 8, 64, 64)  # (B, V, C, T, H, W)
    with torch.no_grad():
        per_view = model({"video": video})["video_ssl"]  # (B, V, D)
        flat = model({"video": video.flatten(0, 1)})["video_ssl"]  # (B * V, D)
    assert per_view.shape == (3, 2, 128)
    torch.testing.assert_close(per_view.flatten(0, 1), flat)


def test_same_sampler_decodes_one_window_and_augments_each_view_apart(demo_shards):
    from mmvssl.data.loader import build_loader
    from mmvssl.data.options import sample_spec
    cfg = load_config(data_path("configs", "methods", "simclr.yaml"), TINY)
    spec = sample_spec(cfg.data, train=True, seed=0)
    batch = next(iter(build_loader(str(demo_shards["train"]), spec, 4, num_workers=0)))
    assert batch["video"].shape == (4, 2, 3, 4, 32, 32)
    assert torch.equal(batch["view_times"][:, 0], batch["view_times"][:, 1])  # one window
    assert not torch.equal(batch["video"][:, 0], batch["video"][:, 1])  # two augmentations
    cfg.data.augment.video = False
    batch = next(iter(build_loader(str(demo_shards["train"]), sample_spec(cfg.data, train=True, seed=0), 4,
                                   num_workers=0)))
    torch.testing.assert_close(batch["video"][:, 0], batch["video"][:, 1])  # the same decoded frames


def test_simclr_loss_is_nt_xent_of_the_two_views():
    from mmvssl.methods.simclr import SimCLR, SimCLROptions
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(4, 2, 8, generator=g), dim=-1)
    loss, _ = SimCLR(SimCLROptions(temperature=0.5))({"video_ssl": z}, {})
    # by hand: 2N = 8 anchors, each against the 7 others, positive = its pair
    views = torch.cat([z[:, 0], z[:, 1]])  # (8, D)
    sim = views @ views.T / 0.5
    expected = 0.0
    for i in range(8):
        pos = (i + 4) % 8
        others = [j for j in range(8) if j != i]
        expected += -(sim[i, pos] - torch.logsumexp(sim[i, others], dim=0))
    assert loss.item() == pytest.approx(expected.item() / 8, rel=1e-5)


def test_iboot_teacher_sees_its_own_view_and_the_student_the_other():
    from mmvssl.losses.objective import Objective
    from mmvssl.methods.contrastive import Contrastive
    seen = []

    def teacher(video):  # (B, C, T, H, W) -> teacher_frames (B, T, D)
        seen.append(video.clone())
        return {"teacher_frames": video.mean(dim=(1, 3, 4))[..., None]}

    method = Contrastive(Objective([{"name": "va", "loss": "nce", "inputs": ["video_va", "audio_va"]}]), teacher,
                         teacher_view=1)
    video = torch.randn(2, 2, 3, 4, 8, 8)
    batch = method.prepare({"video": video.clone()})
    torch.testing.assert_close(seen[0], video[:, 1])
    torch.testing.assert_close(batch["video"], video[:, 0])
    torch.testing.assert_close(batch["teacher_frames"][..., 0], video[:, 1].mean(dim=(1, 3, 4)))


def test_iboot_is_rgb_only_and_its_mmv_variant_adds_audio_and_text():
    """iBoot (Saxena et al. 2022) trains a video student against an image teacher alone; MMV's audio and
    text terms beside it are this repository's variant, a config of its own."""
    from mmvssl.modalities import modality_of

    def inputs(name):
        cfg = load_config(data_path("configs", "methods", f"{name}.yaml"))
        assert cfg.method.options.teacher_view == 1 and cfg.teacher.arch and cfg.data.sampler == "same"
        return {modality_of(x) for t in cfg.objective.terms if t.weight > 0 for x in t.inputs} - {"teacher"}
    assert inputs("iboot") == {"video"}
    assert inputs("iboot_mmv") == {"video", "audio", "text"}


def test_teacher_view_without_views_or_teacher_is_refused(demo_shards, tmp_path):
    from mmvssl.train.engine import pretrain
    path = data_path("configs", "methods", "iboot.yaml")
    with pytest.raises(ConfigError, match="teacher_view=1: needs an online teacher"):
        pretrain(tiny_config(path, demo_shards["train"], tmp_path, "data.sampler=random", "data.num_clips=1"))


# --- SVT / DINO -----------------------------------------------------------------------------------------

def _svt(**options):
    import mmvssl
    from mmvssl.methods.svt import SVT, SVTOptions
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    return student, SVT(student, SVTOptions(prototypes=16, **options), num_global=2, max_steps=10)


def test_dino_loss_matches_a_hand_computation():
    from mmvssl.methods.svt import dino_loss
    g = torch.Generator().manual_seed(1)
    student, teacher, center = torch.randn(3, 4, 5, generator=g), torch.randn(3, 2, 5, generator=g), torch.randn(5, generator=g)
    expected, pairs = 0.0, 0
    for b in range(3):
        for gv in range(2):
            p = torch.exp((teacher[b, gv] - center) / 0.04)
            p = p / p.sum()
            for v in range(4):
                if v != gv:
                    q = torch.exp(student[b, v] / 0.1)
                    expected += -(p * torch.log(q / q.sum())).sum() / 3
                    pairs += 1 if b == 0 else 0
    assert dino_loss(student, teacher, center, 0.1, 0.04).item() == pytest.approx(expected.item() / pairs, rel=1e-5)


def test_svt_teacher_takes_no_gradient_and_is_the_ema_of_the_student():
    student, method = _svt(momentum_start=0.9, momentum_end=1.0)
    opt = torch.optim.SGD(list(student.parameters()) + list(method.prototypes.parameters()), lr=0.5)
    video = torch.randn(2, 4, 3, 4, 32, 32)
    before = {n: p.clone() for n, p in method.teacher.named_parameters()}
    loss, _ = method(method.embed(student, {"video": video}), {})
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is None for p in method.teacher_prototypes.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.prototypes.parameters())
    opt.step()
    method.after_step(student, 1)
    m = method.momentum(0)
    assert m == pytest.approx(0.9)
    for (name, t), s in zip(method.teacher.named_parameters(), student.parameters()):
        torch.testing.assert_close(t, m * before[name] + (1 - m) * s.detach(), msg=name)
    assert method.momentum(10) == pytest.approx(1.0) and 0.9 < method.momentum(5) < 1.0  # the cosine


def test_dino_centre_moves_to_the_teacher_mean_at_its_momentum():
    student, method = _svt(center_momentum=0.8)
    method.center.fill_(0.5)
    embeddings = method.embed(student, {"video": torch.randn(3, 4, 3, 4, 32, 32)})
    method(embeddings, {})
    mean = embeddings["teacher"].float().mean(dim=(0, 1))
    method.after_step(student, 1)
    torch.testing.assert_close(method.center, 0.8 * 0.5 + 0.2 * mean)


def test_svt_resumes_its_teacher_and_centre_exactly(demo_shards, tmp_path, monkeypatch):
    """4 steps straight, and the same run stopped by SIGINT during step 2 and resumed: the same
    losses, the same teacher, centre and schedule position."""
    import signal

    from mmvssl.methods import svt
    from mmvssl.train.engine import pretrain
    path = data_path("configs", "methods", "svt.yaml")
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(tiny_config(path, demo_shards["train"], straight, "train.max_steps=4"))
    calls, real = [], svt.dino_loss

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(svt, "dino_loss", signalling)
    stopped = pretrain(tiny_config(path, demo_shards["train"], split, "train.max_steps=4"))
    assert stopped.name == "step_00000002"
    pretrain(tiny_config(path, demo_shards["train"], split, "train.max_steps=4", "train.resume=latest"))
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(split / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7), x["step"]
        assert x["momentum"] == pytest.approx(y["momentum"])
    from safetensors.torch import load_file
    sa = load_file(str(straight / "checkpoints" / "step_00000004" / "method.safetensors"))
    sb = load_file(str(split / "checkpoints" / "step_00000004" / "method.safetensors"))
    assert set(sa) == set(sb) and any(k.startswith("teacher.") for k in sa) and "center" in sa
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_methods_command_lists_every_method(capsys):
    from mmvssl.cli import main
    from mmvssl.methods import MODULES
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in MODULES:
        assert name in out
    assert "SimCLR (Chen et al. 2020)" in out and "configs/methods/cvrl.yaml" in out
    # every method with a shipped config shows it: supervised fine-tuning's is configs/finetune/base.yaml
    assert "configs: -" not in out and "configs/finetune/base.yaml" in out
