import pytest
import torch

import mmvssl
from mmvssl.errors import ConfigError
from mmvssl.models.accounting import build_on_meta, example_inputs
from mmvssl.models.encoders import _drop_tokens
from mmvssl.models.presets import load_preset
from mmvssl.models.transformer import set_attention_impl

PRESETS = mmvssl.list_presets()
TINY = [p for p in PRESETS if "tiny" in p]  # CPU-sized: built for real; the others only on meta


def tiny_batch(model, b=3, k=2):
    return example_inputs(model.config, batch=b, candidates=k)


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_preset_trains_and_saves(name, tmp_path):
    """Forward + backward reach every parameter; save_pretrained / load_model give identical outputs."""
    torch.manual_seed(0)
    model = mmvssl.create_model(name)
    batch = tiny_batch(model, b=2)
    out = model(batch)
    assert all(e.shape[0] == 2 for e in out.values())
    text_outputs = [e.shape[:2] for k, e in out.items() if k.startswith("text_")]
    assert text_outputs == ([(2, 2)] if "text" in model.encoders else [])
    for emb in out.values():
        assert torch.allclose(emb.norm(dim=-1), torch.ones(emb.shape[:-1]), atol=1e-5)
    loss = sum(e.sum() * (i + 1) for i, e in enumerate(out.values())) + sum(
        (e * torch.randn_like(e)).sum() for e in out.values())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and p.requires_grad]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    model.eval()
    with torch.no_grad():
        before = model(batch)
    model.save_pretrained(tmp_path / "m")
    loaded = mmvssl.load_model(tmp_path / "m").eval()
    with torch.no_grad():
        after = loaded(batch)
    assert before.keys() == after.keys()
    for k in before:  # exact: the same weights (safetensors keeps the bits), ops and inputs in one process
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("name", [p for p in PRESETS if p not in TINY])
def test_every_full_size_preset_wires_up_on_the_meta_device(name):
    """Full-size presets build (no memory) and run forward on meta tensors at their input sizes."""
    model = build_on_meta(load_preset(name)).eval()
    out = model(example_inputs(model.config, batch=2, candidates=3, device="meta"))
    assert {k.split("_")[0] for k in out} == {"video", "audio", "text"}
    assert all(e.shape[0] == 2 for e in out.values())


def test_save_and_load_give_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = mmvssl.create_model("vatt-tiny").eval()
    batch = tiny_batch(model)
    with torch.no_grad():
        model.train()(batch)  # move the BatchNorm running statistics away from their init
        model.eval()
        before = model(batch)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = mmvssl.load_model(tmp_path / "m").eval()
    with torch.no_grad():
        after = loaded(batch)
    for k in before:  # exact, as above: BatchNorm statistics included
        assert torch.equal(before[k], after[k]), k


def test_overwriting_a_saved_model_is_atomic(tmp_path):
    model = mmvssl.create_model("vatt-tiny")
    model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unknown_preset_names_the_preset_and_the_choices():
    with pytest.raises(ConfigError, match="unknown model preset 'vatt-huge'.*vatt-tiny"):
        mmvssl.create_model("vatt-huge")


def test_misspelt_preset_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'vatt-tiny.video.dpth'"):
        mmvssl.create_model("vatt-tiny", **{"video.dpth": 3})


def test_overrides_change_the_architecture():
    deep = mmvssl.create_model("vatt-tiny", **{"video.depth": 3})
    assert len(deep.encoders["video"].transformer.blocks) == 3


def test_wrong_input_shape_names_the_expected_shape():
    model = mmvssl.create_model("vatt-tiny")
    with pytest.raises(ValueError, match=r"expects \(B, 3, T, H, W\)"):
        model.encode_video(torch.randn(2, 8, 64, 64))
    with pytest.raises(ValueError, match="not divisible by the tubelet"):
        model.encode_video(torch.randn(2, 3, 8, 60, 64))
    with pytest.raises(ValueError, match=r"expects a waveform \(B, S\)"):
        model.encode_audio(torch.randn(2, 1, 32000))
    with pytest.raises(ValueError, match=r"expects token ids \(B, L\)"):
        model.encode_text(torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        model.encode_image(torch.randn(2, 3, 8, 64, 64))
    with pytest.raises(ValueError, match="text embeds only in space.*'vat'.*not 'va'"):
        model.encode_text(torch.randint(1, 9, (2, 5)), space="va")


def test_misspelt_or_misplaced_keys_are_named():
    with pytest.raises(ConfigError, match="unknown key 'mmv-tiny.video.arhc'"):
        mmvssl.create_model("mmv-tiny", **{"video.arhc": "s3d"})
    with pytest.raises(ConfigError, match="unknown audio.type 'wave'.*waveform, spectrogram, resnet"):
        mmvssl.create_model("vatt-tiny", **{"audio.type": "wave"})
    with pytest.raises(ConfigError, match="unknown heads.type 'fca'"):
        mmvssl.create_model("vatt-tiny", **{"heads.type": "fca"})
    with pytest.raises(ConfigError, match="unknown key 'vatt-tiny.heads.va_dims'"):
        mmvssl.create_model("vatt-tiny", **{"heads.va_dims": 3})
    with pytest.raises(ConfigError, match="'vatt-tiny-ma.video.width' is set by 'vatt-tiny-ma.backbone'"):
        mmvssl.create_model("vatt-tiny-ma", **{"video.width": 64})
    with pytest.raises(ConfigError, match="unknown key 'vatt-tiny-ma.backbone.widht'"):
        mmvssl.create_model("vatt-tiny-ma", **{"backbone.widht": 64})
    with pytest.raises(ConfigError, match="mmv-tiny.video: unknown torchvision video backbone 'r3d_50'"):
        mmvssl.create_model("mmv-tiny", **{"video.arch": "r3d_50"})


def test_sdpa_and_plain_attention_agree():
    torch.manual_seed(0)
    model = mmvssl.create_model("vatt-tiny-logmel").eval()  # includes a relative position bias
    batch = tiny_batch(model, b=2)
    batch["text"][:, :, 20:] = 0  # padding
    with torch.no_grad():
        fused = model(batch)
        set_attention_impl(model, "math")
        plain = model(batch)
    for k in fused:
        assert torch.allclose(fused[k], plain[k], atol=1e-5), k


def test_other_input_sizes_interpolate_positions():
    model = mmvssl.create_model("vatt-tiny").eval()
    assert model.encode_video(torch.randn(2, 3, 16, 96, 96)).shape == (2, 64)
    assert model.encode_audio(torch.randn(2, 16000)).shape == (2, 128)


def test_drop_token_keeps_the_requested_share_in_training_only():
    x = torch.arange(2 * 10 * 1, dtype=torch.float).view(2, 10, 1)
    kept = _drop_tokens(x, 0.5)
    assert kept.shape == (2, 5, 1)
    assert len(set(kept[0, :, 0].tolist())) == 5  # distinct tokens, no repeats
    model = mmvssl.create_model("vatt-tiny", **{"video.drop_token": 0.5})
    enc = model.encoders["video"]
    video = torch.randn(1, 3, 8, 64, 64)
    assert enc.train()(video)["tokens"].shape[1] == 32  # 64 tubelets -> 32
    assert enc.eval()(video)["tokens"].shape[1] == 64


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = mmvssl.create_model("vatt-tiny").train()
    enc = model.encoders["video"]
    video = torch.randn(2, 3, 8, 64, 64)
    enc(video)["pooled"].sum().backward()
    plain = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    enc.transformer.grad_checkpointing = True
    enc(video)["pooled"].sum().backward()
    for n, p in enc.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n


@pytest.mark.parametrize("name", ["vatt-tiny-logmel", "vatt-tiny-ma"])
def test_gradient_checkpointing_gives_the_same_gradients_for_every_encoder(name):
    """Log-mel audio, T5-style text (relative bias), and the shared modality-agnostic backbone."""
    torch.manual_seed(0)
    model = mmvssl.create_model(name, **{"video.drop_token": 0.0, "audio.drop_token": 0.0,
                                         "text.vocab_size": 1000}).train()
    batch = tiny_batch(model, b=2)

    def grads():
        model.zero_grad()
        out = model(batch)
        sum((e * torch.linspace(-1, 1, e.shape[-1])).sum() for e in out.values()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for n in plain:
        assert torch.allclose(checkpointed[n], plain[n], atol=1e-5), n


def test_misspelt_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nvidoe:\n  width: 8\ntext:\n  width: 8\n  depth: 1\n  heads: 2\n")
    with pytest.raises(ConfigError, match="preset 'mine': unknown key 'vidoe'"):
        mmvssl.create_model(str(path))
    path.write_text("name: mine\nvideo:\n  width: 8\n  depth: 1\n  heads: 2\n  num_frame: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'mine.video.num_frame'"):
        mmvssl.create_model(str(path))
