"""CLIP initialisation of the text tower (model.init_towers: [video, text]) and the causal text
encoder it needs: the copy must compute open_clip's own encode_text."""

import json

import pytest
import torch

import mmvssl
from mmvssl.errors import ConfigError
from mmvssl.models.clip_init import init_from_clip

# A GELU open_clip model (no quick_gelu) with CLIP's BPE vocabulary, small enough for CPU tests.
TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TEXT = {"text.width": 32, "text.depth": 2, "text.heads": 2, "text.context_length": 16, "text.causal": True,
        "heads.vat_dim": 24}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    root = tmp_path_factory.mktemp("clip")
    arch = root / "mmvssl-tiny-clip-text.json"
    arch.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    model = open_clip.create_model(arch.stem)
    weights = root / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    return {"arch": str(arch), "pretrained": str(weights), "model": model.eval()}


def tokens(texts):
    import open_clip
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)(texts)


def test_text_tower_from_clip_computes_open_clips_encode_text(tiny_clip):
    torch.manual_seed(1)
    net = mmvssl.create_model("vatt-tiny", **TEXT).eval()
    done = init_from_clip(net, tiny_clip["arch"], tiny_clip["pretrained"], ["text"])
    assert {"text.token_embed", "text.pos", "text.blocks.0", "text.blocks.1", "text.norm", "text.text_head"} <= set(done)
    assert not any(name.startswith("video.") for name in done)  # only the towers asked for
    assert net.config["text"]["act"] == "gelu"  # the tiny CLIP's own activation
    # "!" is token id 0, the same id open_clip pads with: inside a text it must stay a token.
    ids = tokens(["a red circle moves left", "stop! a blue square", "", "a very long narration " * 6])
    with torch.no_grad():
        ours = net.encode_text(ids)
        theirs = tiny_clip["model"].encode_text(ids, normalize=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_video_and_text_towers_together_and_errors_name_the_key(tiny_clip):
    net = mmvssl.create_model("vatt-tiny", **TEXT, **{"video.width": 32, "video.depth": 1, "video.heads": 2,
                                                        "video.patch": [2, 8, 8]})
    done = init_from_clip(net, tiny_clip["arch"], tiny_clip["pretrained"], ["video", "text"])
    assert "video.patch_embed" in done and "text.blocks.1" in done
    bidirectional = mmvssl.create_model("vatt-tiny", **{**TEXT, "text.causal": False})
    with pytest.raises(ConfigError, match="text.causal: true"):
        init_from_clip(bidirectional, tiny_clip["arch"], tiny_clip["pretrained"], ["text"])
    narrow = mmvssl.create_model("vatt-tiny", **{**TEXT, "text.width": 64})
    with pytest.raises(ConfigError, match="width 32"):
        init_from_clip(narrow, tiny_clip["arch"], tiny_clip["pretrained"], ["text"])
    with pytest.raises(ConfigError, match="model.init_towers"):
        init_from_clip(net, tiny_clip["arch"], tiny_clip["pretrained"], ["audio"])
    with pytest.raises(ConfigError, match="model.init_pretrained: checkpoint file not found"):
        init_from_clip(net, tiny_clip["arch"], "/no/such/weights.pt", ["text"])
    conv = mmvssl.create_model("vatt-tiny", **{"video.width": 32, "video.depth": 1, "video.heads": 2,
                                               "video.patch": [2, 8, 8], "video.stem": "conv"})
    with pytest.raises(ConfigError, match="video.stem: patch"):
        init_from_clip(conv, tiny_clip["arch"], tiny_clip["pretrained"], ["video"])


def test_text_head_is_left_alone_when_its_shape_differs(tiny_clip):
    net = mmvssl.create_model("vatt-tiny", **{**TEXT, "heads.vat_dim": 12})
    before = net.heads.text_to_vat.weight.clone()
    done = init_from_clip(net, tiny_clip["arch"], tiny_clip["pretrained"], ["text"])
    assert "text.text_head" not in done and "text.blocks.1" in done
    assert torch.equal(net.heads.text_to_vat.weight, before)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_the_trailing_run_of_pad_ids_only(causal):
    """Trailing padding changes nothing; a pad id inside the text (open_clip's '!') is attended to."""
    torch.manual_seed(0)
    enc = mmvssl.create_model("vatt-tiny", **{"text.causal": causal}).encoders["text"].eval()
    short = torch.tensor([[49406, 320, 0, 1929, 49407]])
    padded = torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = enc(short)["pooled"]
        b = enc(padded)["pooled"]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        enc.token_embed.weight[0] += torch.randn(enc.width)  # the "!" inside the text now reads differently
        assert not torch.allclose(enc(short)["pooled"], a, atol=1e-4)
        empty = enc(torch.zeros(2, 6, dtype=torch.long))["pooled"]
    assert torch.isfinite(empty).all()


def test_causal_text_token_outputs_do_not_see_later_tokens():
    torch.manual_seed(0)
    enc = mmvssl.create_model("vatt-tiny", **{"text.causal": True}).encoders["text"].eval()
    a = torch.tensor([[49406, 320, 1929, 533, 49407]])
    b = a.clone()
    b[0, 3] = 900
    with torch.no_grad():
        ta, tb = enc(a)["tokens"], enc(b)["tokens"]
    torch.testing.assert_close(ta[:, :3], tb[:, :3])  # positions before the change are unchanged
    assert not torch.allclose(ta[:, 3:], tb[:, 3:])


def test_engine_initialises_the_towers_named_in_the_config(tiny_clip, tmp_path):
    from accelerate import Accelerator
    from mmvssl.config import load_config
    from mmvssl.resources import data_path
    from mmvssl.methods import BuildContext, build_method
    from mmvssl.train.engine import sample_spec
    overrides = [f"model.overrides.{k}={json.dumps(v)}" for k, v in TEXT.items()]
    cfg = load_config(data_path("configs", "demo", "tiny.yaml"), [
        *overrides, f"model.init_arch={tiny_clip['arch']}", f"model.init_pretrained={tiny_clip['pretrained']}",
        "model.init_towers=[text]"])
    ctx = BuildContext(accelerator=Accelerator(cpu=True), out=tmp_path, spec=sample_spec(cfg, train=True))
    net = build_method(cfg, ctx)[0].eval()
    ids = tokens(["a green triangle"])
    with torch.no_grad():
        torch.testing.assert_close(net.encode_text(ids), tiny_clip["model"].encode_text(ids, normalize=True),
                                   rtol=1e-5, atol=1e-5)
    assert load_config(data_path("configs", "demo", "tiny.yaml"), []).model.init_towers == ["video"]


def test_an_openai_style_quick_gelu_clip_switches_the_towers_activation_and_it_reloads(tmp_path):
    import open_clip
    arch = tmp_path / "mmvssl-tiny-clip-quickgelu.json"
    arch.write_text(json.dumps({**TINY_CLIP, "quick_gelu": True}))  # as OpenAI's weights were trained
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    clip = open_clip.create_model(arch.stem).eval()
    weights = tmp_path / "quick.pt"
    torch.save(clip.state_dict(), weights)
    net = mmvssl.create_model("vatt-tiny", **TEXT, **{"video.width": 32, "video.depth": 1, "video.heads": 2,
                                                        "video.patch": [2, 8, 8]})
    init_from_clip(net, str(arch), str(weights), ["video", "text"])
    assert net.config["video"]["act"] == net.config["text"]["act"] == "quick_gelu"
    ids = tokens(["a red circle moves left", "a blue square"])
    net.eval()
    with torch.no_grad():  # with GELU in its blocks the copy would not compute CLIP's embedding
        torch.testing.assert_close(net.encode_text(ids), clip.encode_text(ids, normalize=True), rtol=1e-5, atol=1e-5)
    net.save_pretrained(tmp_path / "model")
    again = mmvssl.load_model(tmp_path / "model").eval()
    video = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # exact: the reloaded weights are the same bits, run by the same code in this process
        assert torch.equal(again.encoders["video"](video)["pooled"], net.encoders["video"](video)["pooled"])
        assert torch.equal(again.encode_text(ids), net.encode_text(ids))
