"""The motion methods on cached optical flow: the demo shards through `shards add-flow`, then maclr,
coclr, mscl and stcmix with `method.options.motion=flow` and `data.flow=true` train through the engine, their
motion pathway built for 2 flow channels and fed the batch's flow (the tgrad path is every config's
default: tests/test_methods.py). And the model's own `tgrad` stream: taken between consecutive decoded
frames (`video_next`) when the batch carries them."""

from __future__ import annotations

import math

import pytest
import torch

from mmvssl.data.motion import temporal_gradient

from mmvssl.config import load_config
from mmvssl.resources import data_path
from tests.conftest import read_jsonl


@pytest.fixture(scope="module")
def demo_flow_shards(demo_shards, tmp_path_factory):
    from mmvssl.data.add_flow import add_flow
    out = tmp_path_factory.mktemp("demo-flow")
    add_flow(str(demo_shards["train"]), out, fps=4.0, size=32, progress=False)
    return out


@pytest.mark.parametrize("name", ["maclr", "coclr", "mscl", "stcmix"])
def test_motion_method_trains_on_cached_flow(name, demo_flow_shards, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from mmvssl.methods import motion_stream
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    seen = []
    real = motion_stream.motion_input

    def recording(batch, kind):
        seen.append((kind, "flow" in batch and batch["flow"].shape[-4] == 2))
        return real(batch, kind)
    monkeypatch.setattr(motion_stream, "motion_input", recording)
    monkeypatch.setattr(f"mmvssl.methods.{name}.motion_input", recording, raising=False)
    cfg = tiny_config(data_path("configs", "methods", f"{name}.yaml"), demo_flow_shards, tmp_path,
                      "train.max_steps=1", "train.save_every=1", "method.options.motion=flow", "data.flow=true")
    pretrain(cfg)
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log] == [1] and all(math.isfinite(r["loss"]) for r in log)
    assert seen and all(kind == "flow" and has_flow for kind, has_flow in seen)
    state = load_file(str(tmp_path / "checkpoints" / "step_00000001" / "method.safetensors"))
    first = [v for k, v in state.items() if k.startswith("motion.network.encoders.video.") and v.ndim == 4][0]
    assert first.shape[1] == 2  # the stem's first convolution takes the 2 flow channels
    assert torch.isfinite(first).all()


def test_mcl_focuses_on_cached_flow(demo_flow_shards, tmp_path, monkeypatch):
    """MCL has no motion network: the flow's magnitude is its motion map (sampling and Grad-CAM target)."""
    from mmvssl.methods import mcl
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    kinds, real = [], mcl.motion_magnitude

    def recording(batch, kind):
        kinds.append(kind)
        assert kind != "flow" or batch["flow"].shape[-4] == 2
        return real(batch, kind)
    monkeypatch.setattr(mcl, "motion_magnitude", recording)
    cfg = tiny_config(data_path("configs", "methods", "mcl.yaml"), demo_flow_shards, tmp_path, "train.max_steps=1",
                      "train.save_every=0", "method.options.motion=flow", "data.flow=true")
    pretrain(cfg)
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert kinds == ["flow"] and all(math.isfinite(r["loss"]) and r["align"] >= 0 for r in log)


# the shipped configs that read cached optical flow (data.flow): tests/test_methods.py trains every other
# config on the plain demo shards; these train here on the demo shards through `shards add-flow`
FLOW_CONFIGS = sorted(p for p in data_path("configs", "methods").glob("*.yaml") if load_config(p).data.flow)


def test_mscl_ships_the_papers_setting_on_flow():
    cfg = load_config(data_path("configs", "methods", "mscl_flow.yaml"))
    assert data_path("configs", "methods", "mscl_flow.yaml") in FLOW_CONFIGS
    assert cfg.method.name == "mscl" and cfg.data.flow and cfg.data.sampler == "same" and cfg.data.num_clips == 2
    assert cfg.method.options.motion == "flow" and cfg.method.options.rotation
    assert cfg.method.options.temperature == 0.07  # the official T


@pytest.mark.parametrize("path", FLOW_CONFIGS, ids=lambda p: p.stem)
def test_flow_config_trains_on_cached_flow(path, demo_flow_shards, tmp_path, monkeypatch):
    """Each flow config as shipped (MSCL's: flow with FRA) trains 2 steps on cached flow: the motion
    stream reads the batch's flow, and with rotation on it also sees every clip's flow turned by one
    angle in [0.2, 1.8] pi."""
    import mmvssl
    from mmvssl.methods import mscl
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    angles = []
    real_rotate = mscl.rotate_flow

    def recording_rotate(flow, beta, dim):
        angles.append(torch.as_tensor(beta).flatten() / math.pi)
        return real_rotate(flow, beta, dim)
    monkeypatch.setattr(mscl, "rotate_flow", recording_rotate)
    cfg = tiny_config(path, demo_flow_shards, tmp_path, "train.max_steps=2", "train.save_every=0")
    final = pretrain(cfg)
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    if cfg.method.name == "mscl" and cfg.method.options.rotation:
        assert len(angles) == 2 and all(a.numel() == cfg.data.batch_size for a in angles)
        drawn = torch.cat(angles)
        assert ((drawn >= 0.2 - 1e-6) & (drawn <= 1.8 + 1e-6)).all()
    with torch.no_grad():  # the student ships alone and embeds RGB clips
        assert mmvssl.load_model(final).eval()({"video": torch.zeros(1, 3, 4, 32, 32)})["video_ssl"].shape == (1, 128)


def _tgrad_model():
    from mmvssl.models.multimodal import MultimodalModel
    stream = {"width": 32, "depth": 1, "heads": 2, "patch": [2, 8, 8], "num_frames": 4, "image_size": 32}
    torch.manual_seed(0)
    return MultimodalModel({"name": "tgrad-test", "video": dict(stream), "tgrad": dict(stream),
                            "heads": {"type": "projection", "dim": 16, "hidden": 32}}).eval()


@torch.no_grad()
def test_model_tgrad_is_taken_against_the_next_decoded_frames(demo_shards):
    """MultimodalModel computes `tgrad` from `video_next` - `video` (the loader's consecutive frames) when
    the batch carries `video_next`, and from differences of the sampled frames only without it. (Both
    sides feed the encoder the same tensor, video_next - video, so they agree to float rounding.)"""
    from mmvssl.data.loader import SampleSpec, build_loader
    model = _tgrad_model()
    spec = SampleSpec(num_frames=4, fps=4.0, size=32, sampler="same", num_clips=2, seed=5, next_frames=True)
    batch = next(iter(build_loader(str(demo_shards["train"]), spec, batch_size=2, shuffle_buffer=1)))
    video, following = batch["video"], batch["video_next"]  # (B, V, C, T, H, W) each
    assert following.shape == video.shape == (2, 2, 3, 4, 32, 32)
    consecutive = model({"video": video, "tgrad": following - video})["tgrad_ssl"]  # (B, V, D)
    sampled = model({"video": video, "tgrad": temporal_gradient(video)})["tgrad_ssl"]
    out = model({"video": video, "video_next": following})
    assert out["tgrad_ssl"].shape == (2, 2, 16)
    assert torch.allclose(out["tgrad_ssl"], consecutive, atol=1e-6)
    assert (out["tgrad_ssl"] - sampled).abs().max() > 1e-2  # not the sampled frames' differences
    assert torch.allclose(model({"video": video})["tgrad_ssl"], sampled, atol=1e-6)  # no video_next: fallback
