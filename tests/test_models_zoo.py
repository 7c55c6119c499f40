"""The model zoo: parameter counts against the papers, torchvision backbones, the
modality-agnostic variant, deflation to images, the light MMV text head. Big presets are only
ever built on the meta device."""

import pytest
import torch

import mmvssl
from mmvssl.models.accounting import backbone_parameters, build_on_meta, count_parameters, flops_per_clip
from mmvssl.models.audio import LogMel, SpectrogramEncoder
from mmvssl.models.presets import load_preset
from mmvssl.models.text_pool import WordPoolTextEncoder
from mmvssl.models.transformer import relative_position_bucket
from mmvssl.models.video_cnn import ARCHS, TorchvisionVideoEncoder

VATT_SIZES = {"vatt-small": 20.9, "vatt-bbs": 87.9, "vatt-mbs": 155.0, "vatt-lbs": 306.1}


@pytest.mark.parametrize("name", VATT_SIZES)
def test_vatt_video_backbones_match_table_7_within_2_percent(name):
    preset = load_preset(name)
    assert preset["paper"]["video_backbone_params_m"] == VATT_SIZES[name]
    model = build_on_meta(preset)
    counted = backbone_parameters(model.encoders["video"]) / 1e6
    assert abs(counted / VATT_SIZES[name] - 1) < 0.02, f"{name}: {counted:.2f}M vs {VATT_SIZES[name]}M"


def test_modality_agnostic_medium_matches_table_7_and_shares_one_backbone():
    model = build_on_meta(load_preset("vatt-ma-medium"))
    video_path = (count_parameters(model.backbone) + backbone_parameters(model.encoders["video"])) / 1e6
    assert abs(video_path / 155.0 - 1) < 0.02, video_path
    # three modalities, one transformer: the total is far below three Medium backbones
    assert count_parameters(model) < 155.0e6 + 3 * 6e6 + 49408 * 1024 + 2e6


def test_agnostic_backbone_is_one_module_trained_by_every_modality():
    torch.manual_seed(0)
    model = mmvssl.create_model("vatt-tiny-ma", **{"text.vocab_size": 1000})
    shared = model.backbone
    assert all(enc.transformer is shared for enc in model.encoders.values())
    assert not any(".transformer." in k for k in model.state_dict())  # saved once, as backbone.*
    own = {m: {id(p) for p in enc.parameters()} for m, enc in model.encoders.items()}
    assert not own["video"] & own["audio"]  # embeddings, positions, agg tokens, projections are per modality
    grad_of = {}
    for modality in ("audio", "text"):
        model.zero_grad()
        x = {"audio": torch.randn(2, 32000), "text": torch.randint(1, 99, (2, 1, 12))}[modality]
        next(iter(model({modality: x}).values())).sum().backward()
        grad_of[modality] = shared.blocks[0].attn.qkv.weight.grad.clone()
        assert model.encoders["video"].patch_embed.weight.grad is None
    assert grad_of["audio"].abs().sum() > 0 and grad_of["text"].abs().sum() > 0


def test_flops_are_counted_on_meta_and_grow_with_the_preset():
    small, base = flops_per_clip(load_preset("vatt-small")), flops_per_clip(load_preset("vatt-bbs"))
    assert 0 < small["video"] < base["video"]
    # a 6 x 512 transformer on 1 + 1568 tokens: 2 * params * tokens plus attention, within 20%
    rough = 2 * 6 * 12 * 512 ** 2 * 1569 + 2 * 6 * 2 * 1569 ** 2 * 512
    assert abs(small["video"] / rough - 1) < 0.2


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_backbones_share_the_encoder_interface(arch):
    with torch.device("meta"):
        enc = TorchvisionVideoEncoder(arch)
        size = (16, 224, 224) if arch == "mvit_v2_s" else (8, 64, 64)
        out = enc.eval()(torch.randn(2, 3, *size))
    assert out["pooled"].shape == (2, enc.width)
    assert out["tokens"].shape[0] == 2 and out["tokens"].shape[2] == enc.width


def test_mvit_names_its_fixed_input_size():
    with torch.device("meta"):
        enc = TorchvisionVideoEncoder("mvit_v2_s")
        with pytest.raises(ValueError, match=r"\(B, 3, 16, 224, 224\)"):
            enc(torch.randn(1, 3, 8, 112, 112))


def _replicate_temporal_padding(module):
    for m in module.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.padding_mode = "replicate"


def test_transformer_deflation_equals_the_static_clip():
    torch.manual_seed(0)
    model = mmvssl.create_model("vatt-tiny").eval()
    images = torch.randn(2, 3, 64, 64)
    static = images[:, :, None].expand(-1, -1, 8, -1, -1)
    with torch.no_grad():  # exact: forward_image builds this very clip and runs the same forward on it
        assert torch.equal(model.encode_image(images), model.encode_video(static))


@pytest.mark.parametrize("arch,frames", [("mc3_18", 4), ("s3d", 16)])  # s3d pools time down 16x
def test_cnn_deflation_sums_temporal_filters_and_equals_the_static_clip(arch, frames):
    """With frames replicated at the clip's ends, a static clip is the image at every time step,
    so the deflated 2-D network must give exactly the clip's output."""
    torch.manual_seed(0)
    enc = TorchvisionVideoEncoder(arch, num_frames=frames, image_size=32)
    _replicate_temporal_padding(enc)
    for m in enc.modules():  # non-trivial normalisation statistics
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    enc.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        deflated = enc.forward_image(images)["pooled"]
        clip = enc(images[:, :, None].expand(-1, -1, frames, -1, -1))["pooled"]
    assert torch.allclose(deflated, clip, rtol=1e-4, atol=1e-5)


def test_cnn_deflation_is_differentiable_and_does_not_change_the_state_dict():
    torch.manual_seed(0)
    enc = TorchvisionVideoEncoder("mc3_18", num_frames=4, image_size=32)
    keys = set(enc.state_dict())
    enc.forward_image(torch.randn(2, 3, 32, 32))["pooled"].sum().backward()
    assert enc.stages[0][0].weight.grad is not None
    assert set(enc.state_dict()) == keys


def test_drop_token_applies_to_waveform_and_spectrogram_audio():
    model = mmvssl.create_model("vatt-tiny-ma")  # drop_token 0.5
    audio = torch.randn(1, 32000)  # 250 waveform patches
    enc = model.encoders["audio"]
    assert enc.train()(audio)["tokens"].shape[1] == 125
    assert enc.eval()(audio)["tokens"].shape[1] == 250
    spec = SpectrogramEncoder(32, 1, 2, patch=(16, 16), num_samples=32000, drop_token=0.5)
    n = spec.eval()(audio)["tokens"].shape[1]
    assert n == 5 * (201 // 16) and spec.train()(audio)["tokens"].shape[1] == round(n / 2)


def test_log_mel_has_80_bins_and_is_not_saved():
    mel = LogMel(16000, n_mels=80)
    assert mel(torch.randn(2, 16000)).shape == (2, 1, 80, 101)
    assert not mel.state_dict()


def test_word_pool_text_head_max_pools_over_real_words_only():
    torch.manual_seed(0)
    enc = WordPoolTextEncoder(width=16, vocab_size=50, embed_dim=8, context_length=8)
    words = torch.tensor([[5, 7, 9, 0, 0, 0]])
    padded_differently = torch.tensor([[5, 7, 9, 0, 0, 0, 0, 0]])
    a, b = enc(words)["pooled"], enc(padded_differently)["pooled"]
    # 6 and 8 token rows go through the projection as GEMMs of other shapes, which may round the
    # same row in another order (|x| < 0.5 from 8 products: < 1e-7); padding that leaked into the
    # max-pool would change it by far more than 1e-6
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a >= 0).all()
    assert torch.equal(enc(torch.zeros(1, 4, dtype=torch.long))["pooled"], torch.zeros(1, 16))


def test_relative_position_buckets_are_exact_nearby_and_directional():
    rel = torch.arange(-200, 201)
    b = relative_position_bucket(rel, num_buckets=32, max_distance=128)
    assert b.min() >= 0 and b.max() <= 31
    assert len(set(b[(rel > -8) & (rel < 8)].tolist())) == 15  # exact below num_buckets // 4
    assert set(b[rel < 0].tolist()).isdisjoint(b[rel > 0].tolist())
    assert b[0] == b[50] and b[-1] == b[-50]  # clamped beyond max_distance


def test_heads_define_their_spaces():
    torch.manual_seed(0)
    shared = mmvssl.create_model("vatt-tiny-logmel").eval()
    assert shared.encode_audio(torch.randn(2, 32000), space="vat").shape == (2, 64)
    with pytest.raises(ValueError, match="audio embeds only in space.*'vat'"):
        shared.encode_audio(torch.randn(2, 32000), space="va")
    disjoint = mmvssl.create_model("vatt-tiny-ma").eval()
    assert disjoint.encode_video(torch.randn(2, 3, 8, 64, 64), space="vt").shape == (2, 64)
    fac = mmvssl.create_model("vatt-tiny").eval()
    assert fac.encode_audio(torch.randn(2, 32000), space="vat").shape == (2, 64)  # through va -> vat


def test_cnn_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    enc = TorchvisionVideoEncoder("mc3_18", num_frames=4, image_size=32).train()
    video = torch.randn(2, 3, 4, 32, 32)

    def grads():
        enc.zero_grad()
        enc(video)["pooled"].sum().backward()
        return {n: p.grad.clone() for n, p in enc.named_parameters()}

    plain = grads()
    enc.grad_checkpointing = True
    for n, g in grads().items():
        assert torch.allclose(g, plain[n], atol=1e-5), n


def test_conv_stem_gives_the_patch_grid_and_treats_every_frame_alike():
    from mmvssl.models.encoders import VideoEncoder
    torch.manual_seed(0)
    enc = VideoEncoder(32, 1, 2, patch=(2, 8, 8), num_frames=4, image_size=32, stem="conv").eval()
    assert [type(m).__name__ for m in enc.stem.layers][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in enc.stem.layers) == 3  # 8 = 2 ** 3
    video = torch.randn(2, 3, 4, 32, 32)
    out = enc(video)
    assert out["tokens"].shape == (2, 2 * 4 * 4, 32) and out["frames"].shape == (2, 2, 32)
    # per-frame stem: the features of frame k do not depend on the other frames
    moved = video.clone()
    moved[:, :, 1] = torch.randn(2, 3, 32, 32)
    stem, stem_moved = enc.stem(video), enc.stem(moved)
    # the claim is independence, not bits: a dependence on frame 1 would move the features (|x| < 0.3)
    # by far more than 1e-5, while a kernel that summed the <= 288 products of a feature in another
    # order for another batch content or thread split would move them by < 1e-6
    torch.testing.assert_close(stem[:, :, [0, 2, 3]], stem_moved[:, :, [0, 2, 3]], rtol=0, atol=1e-5)
    assert not torch.allclose(stem[:, :, 1], stem_moved[:, :, 1])


def test_conv_stem_rejects_a_patch_it_cannot_reach_naming_the_section():
    from mmvssl.errors import ConfigError
    from mmvssl.models.multimodal import MultimodalModel
    preset = load_preset("vatt-tiny")
    preset["video"].update(stem="conv", patch=[2, 12, 12], image_size=48)
    with pytest.raises(ConfigError, match=r"vatt-tiny\.video: stem 'conv' needs a square power-of-two"):
        MultimodalModel(preset)
    preset["video"].update(stem="convs", patch=[2, 16, 16], image_size=64)
    with pytest.raises(ConfigError, match="unknown stem 'convs'"):
        MultimodalModel(preset)
