"""MaCLR and the motion stream (mmvssl/methods/motion_stream.py): the loss by its terms with the
cross-modal pairs across clips, which term trains which pathway, the motion pathway's input
(frame differences or the batch's flow), the motion pathway trained and checkpointed in the method
and absent from the saved model. (The falling loss on the demo shards: tests/test_methods.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from mmvssl.errors import ConfigError
from mmvssl.resources import data_path


def _maclr(motion="tgrad", **options):
    import mmvssl
    from mmvssl.methods.maclr import MaCLR, MaCLROptions
    from mmvssl.models.multimodal import MultimodalModel
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    config = {**student.config, "video": {**student.config["video"], "in_channels": 3 if motion == "tgrad" else 2}}
    return student, MaCLR(MultimodalModel(config), MaCLROptions(motion=motion, **options))


def test_maclr_loss_is_its_terms_with_the_cross_modal_positives_across_clips():
    from mmvssl.losses.contrastive import nce_loss, nt_xent_loss
    student, method = _maclr(visual_weight=0.5, motion_weight=0.25, cross_weight=2.0, temperature=0.2)
    embeddings = method.embed(student, {"video": torch.randn(6, 2, 3, 4, 32, 32)})
    v, m = embeddings["video_ssl"], embeddings["motion"]
    assert v.shape == m.shape == (6, 2, 128)
    loss, terms = method(embeddings, {})
    cross = 0.5 * (nce_loss(v[:, 0], m[:, 1], 0.2) + nce_loss(v[:, 1], m[:, 0], 0.2))
    same_clip = 0.5 * (nce_loss(v[:, 0], m[:, 0], 0.2) + nce_loss(v[:, 1], m[:, 1], 0.2))
    # the method makes these very nce_loss calls on the same embeddings (exact in practice); the
    # weighted total below adds its terms in another order: a few ulps of ~5, far inside rel 1e-6
    assert terms["cross"].item() == pytest.approx(cross.item(), rel=1e-6)
    assert abs(cross.item() - same_clip.item()) > 1e-4  # the pairing matters: clip 1's RGB with clip 2's motion
    expected = 0.5 * nt_xent_loss(v[:, 0], v[:, 1], 0.2) + 0.25 * nt_xent_loss(m[:, 0], m[:, 1], 0.2) + 2.0 * cross
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("term,visual,motion", [("cross", True, True), ("visual", True, False), ("motion", False, True)])
def test_each_maclr_term_trains_its_pathways(term, visual, motion):
    weights = {f"{t}_weight": float(t == term) for t in ("visual", "motion", "cross")}
    student, method = _maclr(**weights)
    loss, _ = method(method.embed(student, {"video": torch.randn(4, 2, 3, 4, 32, 32)}), {})
    loss.backward()
    def reached(net):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.encoders["video"].parameters())
    assert reached(student) is visual and reached(method.motion.network) is motion


def test_motion_pathway_reads_the_frame_differences_of_each_view():
    from mmvssl.data.motion import temporal_gradient
    student, method = _maclr()
    seen = []
    network = method.motion.network
    real = network.forward
    network.forward = lambda batch: (seen.append(batch["video"]), real(batch))[1]
    video = torch.randn(2, 2, 3, 4, 32, 32)
    method.embed(student, {"video": video})
    torch.testing.assert_close(seen[0], temporal_gradient(video))
    assert seen[0][:, :, :, -1].abs().sum() == 0 and seen[0][:, :, :, 0].abs().sum() > 0


def test_flow_motion_reads_the_batch_flow_and_names_a_missing_or_misshapen_one():
    student, method = _maclr(motion="flow")
    assert method.modalities == {"video", "flow"}
    video = torch.randn(2, 2, 3, 4, 32, 32)
    out = method.embed(student, {"video": video, "flow": torch.randn(2, 2, 2, 4, 32, 32)})
    assert out["motion"].shape == (2, 2, 128)
    with pytest.raises(ConfigError, match="the batch has no 'flow' entry"):
        method.embed(student, {"video": video})
    with pytest.raises(ConfigError, match=r"batch\['flow'\] has shape \(2, 2, 2, 4, 16, 16\)"):
        method.embed(student, {"video": video, "flow": torch.randn(2, 2, 2, 4, 16, 16)})


def test_unknown_motion_input_is_refused():
    with pytest.raises(ConfigError, match="method.options.motion: method 'maclr' reads tgrad or flow, got 'rgb'"):
        _maclr(motion="rgb")


def test_maclr_trains_the_motion_pathway_in_its_state_and_ships_the_visual_one(demo_shards, tmp_path):
    """Two steps through the engine: the motion pathway is optimised and checkpointed in
    method.safetensors; the saved model has no motion weights and takes RGB."""
    import mmvssl
    from safetensors.torch import load_file

    from mmvssl.config import load_config
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    path = data_path("configs", "methods", "maclr.yaml")
    final = pretrain(tiny_config(path, demo_shards["train"], tmp_path, "train.max_steps=2", "train.save_every=1",
                                 "train.keep_last=2"))
    first, second = (load_file(str(tmp_path / "checkpoints" / f"step_0000000{s}" / "method.safetensors")) for s in (1, 2))
    motion_keys = [k for k in second if k.startswith("motion.network.encoders.video.")]
    assert motion_keys and set(first) == set(second)
    assert any(not torch.equal(first[k], second[k]) for k in motion_keys)  # step 2 moved the motion pathway
    model = mmvssl.load_model(final)
    assert model.encoders["video"].in_channels == 3
    assert not any("motion" in k for k in model.state_dict())
    assert load_config(final.parent / "config.yaml").method.options.motion == "tgrad"


def test_maclr_refuses_one_view(demo_shards, tmp_path):
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    with pytest.raises(ConfigError, match="method 'maclr' contrasts two clips"):
        pretrain(tiny_config(data_path("configs", "methods", "maclr.yaml"), demo_shards["train"], tmp_path,
                             "data.sampler=random"))


def test_flow_motion_without_cached_flow_in_the_data_is_refused(demo_shards, tmp_path):
    from mmvssl.train.engine import pretrain
    from tests.test_methods import tiny_config
    for name in ("maclr", "coclr"):
        with pytest.raises(ConfigError, match=f"method '{name}': method.options.motion=flow .* set data.flow=true"):
            pretrain(tiny_config(data_path("configs", "methods", f"{name}.yaml"), demo_shards["train"], tmp_path,
                                 "method.options.motion=flow"))


def test_flow_edges_are_the_magnitude_of_the_flows_spatial_gradient_by_hand():
    """Sobel / 8 derivatives, borders replicated. Frame 0: u = 0.5 x, v = -0.25 y (ramps): inside,
    |du/dx| = 0.5 and |dv/dy| = 0.25, so the edge is sqrt(0.5^2 + 0.25^2); on the left column the
    replicated border halves du/dx (u(1) - u(0) over the 2-pixel Sobel span): sqrt(0.25^2 + 0.25^2).
    Frame 1: u a step of 1 px between columns 1 and 2, v = 0: columns 1 and 2 see a difference of 1
    across the 3 Sobel rows (1 + 2 + 1) / 8 = 0.5, every other column 0. Frame 2: a constant flow (a
    camera pan): no edges."""
    from mmvssl.methods.maclr import flow_edges
    H, W = 4, 5
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    flow = torch.zeros(2, 3, H, W)  # (2, T, H, W)
    flow[0, 0], flow[1, 0] = 0.5 * x, -0.25 * y
    flow[0, 1] = (x >= 2).float()
    flow[0, 2], flow[1, 2] = 3.0, -1.5
    edges = flow_edges(flow[None, None].expand(2, 2, 2, 3, H, W))  # (B, V, 2, T, H, W) -> (B, V, 1, T, H, W)
    assert edges.shape == (2, 2, 1, 3, H, W)
    frame = edges[1, 1, 0]  # (T, H, W)
    inside = math.sqrt(0.5 ** 2 + 0.25 ** 2)
    # three products and sums of exact binary fractions, then one float32 square root: within 1e-6
    torch.testing.assert_close(frame[0, 1:-1, 1:-1], torch.full((H - 2, W - 2), inside), atol=1e-6, rtol=0)
    torch.testing.assert_close(frame[0, 1:-1, 0], torch.full((H - 2,), math.sqrt(0.25 ** 2 + 0.25 ** 2)),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(frame[1], torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]).expand(H, W), atol=1e-6, rtol=0)
    assert torch.equal(frame[2], torch.zeros(H, W))
    assert torch.equal(edges[0, 0], edges[1, 1])  # each view and sample on its own, the same here
    with pytest.raises(ValueError, match=r"flow_edges expects flow \(\.\.\., 2, T, H, W\), got \(3, 4, 5\)"):
        flow_edges(torch.zeros(3, 4, 5))


def test_flow_edges_need_flow_and_feed_a_one_channel_motion_pathway():
    with pytest.raises(ConfigError, match="method.options.flow_edges takes the edges of the cached optical flow"):
        _maclr(motion="tgrad", flow_edges=True)
    import mmvssl
    from mmvssl.methods.maclr import MaCLR, MaCLROptions, flow_edges
    from mmvssl.models.multimodal import MultimodalModel
    torch.manual_seed(0)
    student = mmvssl.create_model("video-tiny", video={"num_frames": 4, "image_size": 32})
    config = {**student.config, "video": {**student.config["video"], "in_channels": 1}}
    method = MaCLR(MultimodalModel(config), MaCLROptions(motion="flow", flow_edges=True))
    seen, real = [], method.motion.network.forward
    method.motion.network.forward = lambda batch: (seen.append(batch["video"]), real(batch))[1]
    flow = torch.randn(2, 2, 2, 4, 32, 32)
    out = method.embed(student, {"video": torch.randn(2, 2, 3, 4, 32, 32), "flow": flow})
    assert out["motion"].shape == (2, 2, 128)
    assert torch.equal(seen[0], flow_edges(flow))  # the edges of each view's flow, one channel


def test_maclr_flow_config_ships_the_edges_of_cached_flow_and_trains(demo_shards, tmp_path):
    """configs/methods/maclr_flow.yaml: flow edges of the cached flow; 2 steps through the engine on the
    demo shards through `shards add-flow`, the motion pathway's first convolution taking 1 channel."""
    from safetensors.torch import load_file

    from mmvssl.config import load_config
    from mmvssl.data.add_flow import add_flow
    from mmvssl.train.engine import pretrain
    from tests.conftest import read_jsonl
    from tests.test_methods import tiny_config
    path = data_path("configs", "methods", "maclr_flow.yaml")
    cfg = load_config(path)
    assert cfg.method.name == "maclr" and cfg.method.options.motion == "flow" and cfg.method.options.flow_edges
    assert cfg.data.flow and cfg.data.sampler == "cvrl"
    shards = tmp_path / "flow-shards"
    add_flow(str(demo_shards["train"]), shards, fps=4.0, size=32, progress=False)
    pretrain(tiny_config(path, shards, tmp_path / "run", "train.max_steps=2", "train.save_every=1",
                         "train.keep_last=2"))
    log = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    first, second = (load_file(str(tmp_path / "run" / "checkpoints" / f"step_0000000{s}" / "method.safetensors"))
                     for s in (1, 2))
    stem = "motion.network.encoders.video.stem.layers.0.weight"  # the conv stem's first (per-frame) convolution
    assert second[stem].shape[1] == 1  # the edges' one channel
    assert not torch.equal(first[stem], second[stem])  # the motion pathway trains
