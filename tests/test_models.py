import pytest
import torch

import mmvssl
from mmvssl.errors import ConfigError
from mmvssl.models.encoders import _drop_tokens

PRESETS = mmvssl.list_presets()


def tiny_batch(model, b=3, k=2):
    v, a, t = model.config["video"], model.config["audio"], model.config["text"]
    return {"video": torch.randn(b, 3, v["num_frames"], v["image_size"], v["image_size"]),
            "audio": torch.randn(b, a["num_samples"]) * 0.1,
            "text": torch.randint(1, 1000, (b, k, t["context_length"]))}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_forward_and_backward_with_gradients_everywhere(name):
    torch.manual_seed(0)
    model = mmvssl.create_model(name)
    out = model(tiny_batch(model))
    assert out["video_va"].shape[0] == 3 and out["text_vat"].shape[:2] == (3, 2)
    for emb in out.values():
        assert torch.allclose(emb.norm(dim=-1), torch.ones(emb.shape[:-1]), atol=1e-5)
    loss = sum(e.sum() * (i + 1) for i, e in enumerate(out.values())) + sum(
        (e * torch.randn_like(e)).sum() for e in out.values())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


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
    for k in before:
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
