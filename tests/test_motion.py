"""Motion inputs: frame differences, and video encoders that take 2-channel flow or 3-channel motion."""

import pytest
import torch

from mmvssl.data.motion import temporal_gradient
from mmvssl.errors import ConfigError
from mmvssl.models import create_model
from mmvssl.models.video_cnn import TorchvisionVideoEncoder


def test_frame_differences_of_a_static_clip_are_zero():
    frame = torch.rand(2, 3, 1, 8, 8)
    static = frame.expand(-1, -1, 5, -1, -1)  # (B, C, T, H, W), every frame the same
    assert torch.equal(temporal_gradient(static), torch.zeros(2, 3, 5, 8, 8))


def test_frame_differences_by_hand_keep_the_frame_count():
    video = torch.tensor([0.0, 1.0, 3.0, 6.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 2, 2)  # (B, C, T, H, W)
    grad = temporal_gradient(video)
    assert grad.shape == video.shape
    assert grad[0, 0, :, 0, 0].tolist() == [1.0, 2.0, 3.0, 0.0]  # last frame's difference is 0
    views = torch.rand(2, 2, 3, 4, 8, 8)  # (B, V, C, T, H, W): the time axis is still -3
    assert torch.equal(temporal_gradient(views)[:, 1], temporal_gradient(views[:, 1]))


@pytest.mark.parametrize("arch", ["r3d_18", "r2plus1d_18", "s3d"])
def test_cnn_encoder_takes_two_channel_flow(arch):
    T = 8 if arch == "s3d" else 4  # s3d pools time by 8
    enc = TorchvisionVideoEncoder(arch, num_frames=T, image_size=32, in_channels=2)
    out = enc(torch.randn(2, 2, T, 32, 32))  # (B, 2, T, H, W)
    assert out["pooled"].shape == (2, enc.width)
    out["pooled"].sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    assert enc.forward_image(torch.randn(2, 2, 32, 32))["pooled"].shape == (2, enc.width)
    with pytest.raises(ValueError, match=rf"expects \(B, 2, T, H, W\), got \(2, 3, {T}, 32, 32\)"):
        enc(torch.randn(2, 3, T, 32, 32))


def test_first_layer_only_changes_and_rgb_is_unchanged():
    torch.manual_seed(0)
    rgb = TorchvisionVideoEncoder("r3d_18", num_frames=4, image_size=32)
    flow = TorchvisionVideoEncoder("r3d_18", num_frames=4, image_size=32, in_channels=2)
    shapes = {k: v.shape for k, v in rgb.state_dict().items()}
    changed = {k for k, v in flow.state_dict().items() if v.shape != shapes[k]}
    assert changed == {"stages.0.0.weight"} and flow.state_dict()["stages.0.0.weight"].shape[1] == 2


def test_presets_take_in_channels_as_an_override():
    for preset in ("video-tiny", "mmv-tiny"):
        model = create_model(preset, **{"video.in_channels": 2})
        enc = model.encoders["video"]
        clip = torch.randn(2, 2, enc.num_frames, enc.image_size, enc.image_size)
        assert model.encode_video(clip, space="ssl" if preset == "video-tiny" else "vat").shape[0] == 2
    cnn = create_model("mmv-r2plus1d", **{"video.in_channels": 2, "video.num_frames": 4, "video.image_size": 32})
    assert cnn.encoders["video"].in_channels == 2
    with pytest.raises(ConfigError, match="in_channels must be a positive integer"):
        create_model("mmv-r2plus1d", **{"video.in_channels": 0})


def _motion_preset(**heads):
    stream = {"width": 32, "depth": 1, "heads": 2, "patch": [2, 8, 8], "num_frames": 4, "image_size": 32}
    return {"name": "motion-test", "video": dict(stream), "flow": dict(stream),
            "tgrad": {"type": "torchvision", "arch": "r3d_18", "num_frames": 4, "image_size": 32},
            "heads": heads or {"type": "projection", "dim": 16, "hidden": 32}}


def test_flow_and_tgrad_streams_have_encoders_heads_and_views():
    from mmvssl.models.multimodal import MultimodalModel
    torch.manual_seed(0)
    model = MultimodalModel(_motion_preset())
    assert model.encoders["flow"].in_channels == 2 and model.encoders["tgrad"].in_channels == 3
    video, flow = torch.randn(2, 2, 3, 4, 32, 32), torch.randn(2, 2, 2, 4, 32, 32)  # (B, V, C, T, H, W)
    out = model({"video": video, "flow": flow})
    assert {k: tuple(v.shape) for k, v in out.items()} == {"video_ssl": (2, 2, 16), "flow_ssl": (2, 2, 16),
                                                           "tgrad_ssl": (2, 2, 16)}
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():  # tgrad is the temporal gradient of the video, computed when the batch has none
        given = model({"video": video, "tgrad": temporal_gradient(video)})["tgrad_ssl"]
        assert torch.allclose(model({"video": video})["tgrad_ssl"], given)
        assert "flow_ssl" not in model({"video": video})  # a stream the batch lacks is not embedded


def test_heads_without_a_space_for_motion_are_named():
    with pytest.raises(ConfigError, match="heads.type 'fac' has no space for the flow stream"):
        from mmvssl.models.multimodal import MultimodalModel
        MultimodalModel(_motion_preset(type="fac"))
    from mmvssl.models.multimodal import MultimodalModel
    shared = MultimodalModel({**_motion_preset(type="shared", dim=8)})
    assert set(shared(({"video": torch.randn(1, 3, 4, 32, 32), "flow": torch.randn(1, 2, 4, 32, 32)}))) == {
        "video_vat", "flow_vat", "tgrad_vat"}


def test_a_motion_stream_is_added_to_a_preset_by_an_override():
    model = create_model("video-tiny", flow={"type": "torchvision", "arch": "r3d_18", "num_frames": 4,
                                             "image_size": 32})
    assert model.encoders["flow"].in_channels == 2 and "flow" in model.heads.mlp
    assert model({"flow": torch.randn(2, 2, 4, 32, 32)})["flow_ssl"].shape == (2, 128)
    with pytest.raises(ConfigError, match="no section 'flow'"):
        create_model("video-tiny", **{"flow.width": 8})


def test_next_frames_are_the_source_frames_right_after_the_sampled_ones(tmp_path, video_factory):
    """decode_window(next_frames=True): the frame decoded right after each picked frame, so the temporal
    gradient spans one source frame (1/10 s here), not the sampling step (1/4 s)."""
    import numpy as np

    from mmvssl.data.decode import decode_window
    path = video_factory(tmp_path / "a.mp4", seconds=4.0, fps=10)  # red = 255 * source index / 40
    data = path.read_bytes()
    clip = decode_window(data, start=1.0, num_frames=8, fps=4.0, size=32, audio_rate=None, next_frames=True)
    picked = [int(10 + 2.5 * i) for i in range(8)]
    red, next_red = clip.frames[:, 16, 16, 0].astype(float), clip.next_frames[:, 16, 16, 0].astype(float)
    assert np.allclose(red, [255 * k / 40 for k in picked], atol=6)  # (the codec's error: a few levels)
    step = next_red - red  # one source frame later (6.4 levels), not a sampling step (2.5 frames, 16 levels)
    assert abs(step.mean() - 255 / 40) < 1.5 and (step > 0).all() and (step < 2 * 255 / 40).all()
    plain = decode_window(data, start=1.0, num_frames=8, fps=4.0, size=32, audio_rate=None)
    assert plain.next_frames is None and np.array_equal(plain.frames, clip.frames)
    end = decode_window(data, start=3.5, num_frames=4, fps=2.0, size=32, audio_rate=None, next_frames=True)
    assert 0 < float(end.next_frames[0, 16, 16, 0]) - float(end.frames[0, 16, 16, 0]) < 2 * 255 / 40  # 35 -> 36
    assert np.array_equal(end.next_frames[-1], end.frames[-1])  # past the end: no successor, no motion


def test_loader_gives_consecutive_frames_augmented_with_their_frames(demo_shards):
    """SampleSpec.next_frames: `video_next` beside `video`, the same crop, flip and colour draw (the
    RGB views are those of a loader without it), and the temporal gradient of the motion methods is
    taken between them."""
    from mmvssl.data.loader import SampleSpec, build_loader
    from mmvssl.methods.motion_stream import motion_input
    spec = SampleSpec(num_frames=4, fps=4.0, size=32, sampler="same", num_clips=2, seed=3)
    plain = next(iter(build_loader(str(demo_shards["train"]), spec, batch_size=2, shuffle_buffer=1)))
    spec.next_frames = True
    batch = next(iter(build_loader(str(demo_shards["train"]), spec, batch_size=2, shuffle_buffer=1)))
    assert batch["video_next"].shape == batch["video"].shape == (2, 2, 3, 4, 32, 32)
    assert batch["key"] == plain["key"] and torch.equal(batch["video"], plain["video"])
    assert torch.equal(motion_input(batch, "tgrad"), batch["video_next"] - batch["video"])
    assert not torch.equal(batch["video_next"], batch["video"])  # the demo's shapes move


def test_motion_methods_ask_the_loader_for_consecutive_frames():
    from mmvssl.data.loader import SampleSpec
    from mmvssl.methods.motion_stream import check_motion_data
    spec = SampleSpec()
    check_motion_data("tgrad", spec, "mscl")
    assert spec.next_frames
