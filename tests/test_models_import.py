"""`mmvssl models import`: tiny random-weight transformers and open_clip models, built from configs
and saved locally (nothing downloaded), imported with --check, then used by extract, eval zeroshot
and index build + search through the CLI like a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmvssl.cli import main

WORDS = ("a an the of in is to and video sound photo red green blue yellow purple orange white circle square triangle "
         "cross ring moves moving left right up down circles bouncing around travels whistling chiming").split()


from tests.test_eval_cli import run_cli  # noqa: E402  (the CLI's exit code, stdout, stderr)


def save_tokenizer(folder: Path):
    """A tiny word-level tokenizer ([BOS] text [EOS], [PAD] = 0; [EOS] has the highest id, which
    X-CLIP's text pooling (argmax of the ids) relies on, as CLIP's BPE does) saved with save_pretrained."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    vocab["[BOS]"], vocab["[EOS]"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[
        ("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                 eos_token="[EOS]")
    hf.save_pretrained(str(folder))
    return len(vocab), vocab["[BOS]"], vocab["[EOS]"]


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _text(vocab, bos, eos, **extra):
    return dict(vocab_size=vocab, max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos, pad_token_id=0,
                **TINY, **extra)


def build_source(kind: str, folder: Path) -> str:
    """A tiny random-weight model of `kind` saved like a release (weights, config, tokenizer, processor)."""
    import transformers as tf
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    vocab, bos, eos = save_tokenizer(folder)
    vision = dict(image_size=32, patch_size=16, **TINY)
    if kind == "xclip":
        model = tf.XCLIPModel(tf.XCLIPConfig(text_config=_text(vocab, bos, eos), projection_dim=32, prompt_layers=1,
                                             prompt_attention_heads=2, vision_config=dict(
                                                 num_frames=4, mit_hidden_size=32, mit_intermediate_size=64,
                                                 mit_num_hidden_layers=1, mit_num_attention_heads=2, **vision)))
        tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "clap":
        model = tf.ClapModel(tf.ClapConfig(
            text_config=dict(vocab_size=vocab, max_position_embeddings=40, pad_token_id=0, projection_dim=16, **TINY),
            audio_config=dict(hidden_size=32, depths=[1, 1], num_heads=[2, 2], patch_embeds_hidden_size=16, spec_size=64,
                              window_size=4, num_mel_bins=16, patch_size=4, projection_dim=16, enable_fusion=False),
            projection_dim=16))
        tf.ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, fft_window_size=1024,
                                max_length_s=2, padding="repeatpad", truncation="rand_trunc").save_pretrained(folder)
    elif kind == "videomae":
        model = tf.VideoMAEModel(tf.VideoMAEConfig(num_frames=4, tubelet_size=2, use_mean_pooling=True, **vision))
        tf.VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "vjepa2":
        model = tf.VJEPA2Model(tf.VJEPA2Config(crop_size=32, patch_size=16, frames_per_clip=4, tubelet_size=2,
                                               hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                               pred_hidden_size=32, pred_num_hidden_layers=1,
                                               pred_num_attention_heads=2, pred_num_mask_tokens=2))
    elif kind == "timesformer":
        model = tf.TimesformerModel(tf.TimesformerConfig(num_frames=4, **vision))
    elif kind == "vivit":
        model = tf.VivitModel(tf.VivitConfig(image_size=32, num_frames=4, tubelet_size=[2, 16, 16], **TINY))
        tf.VivitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(text_config=_text(vocab, bos, eos), vision_config=vision, projection_dim=16))
    elif kind == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(text_config=_text(vocab, bos, eos, projection_size=32),
                                               vision_config=vision))
    else:
        raise ValueError(kind)
    model.save_pretrained(str(folder))
    return str(folder)


TINY_OPEN_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                                  "patch_size": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def build_open_clip(folder: Path) -> str:
    """open_clip:ARCH_JSON:WEIGHTS of a tiny CLIP (CLIP's BPE vocabulary, so open_clip's own tokenizer fits)."""
    import open_clip
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    arch = folder / "mmvssl-tiny-clip.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    model = open_clip.create_model("mmvssl-tiny-clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
    return f"open_clip:{arch}:{folder / 'weights.safetensors'}"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """kind -> (source, model folder), each imported once with --check through the CLI."""
    root = tmp_path_factory.mktemp("imported")
    cache = {}

    def get(kind: str):
        if kind not in cache:
            source = build_open_clip(root / "src-open_clip") if kind == "open_clip" else build_source(kind, root / f"src-{kind}")
            out = root / kind
            assert main(["models", "import", source, "--out", str(out), "--check"]) == 0
            cache[kind] = (source, out)
        return cache[kind]
    return get


@pytest.fixture(scope="module")
def last_val_shard(demo_shards):
    return sorted(Path(demo_shards["val"]).glob("*.tar"))[-1]  # 4 samples: keeps the tests fast


def _check(folder: Path) -> dict:
    return json.loads((folder / "check.json").read_text())


def _extract(capsys, model, shard, out) -> dict:
    code, stdout, err = run_cli(capsys, "extract", model, "--data", shard, "--out", out)
    assert code == 0, err
    from mmvssl.evaluation.features import load_features
    return load_features(out)


def _index_and_search(capsys, model, shard, tmp_path, *query) -> list:
    code, _, err = run_cli(capsys, "index", "build", model, "--input", shard, "--out", tmp_path / "index", "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "search", tmp_path / "index", *query, "-k", "3", "--json")
    assert code == 0, err
    return json.loads(out)


def _a_video(shard: Path, tmp_path: Path) -> tuple[Path, str]:
    """The first video of the shard as a file (a query), and its key."""
    import webdataset as wds
    sample = next(iter(wds.WebDataset(str(shard), shardshuffle=False)))
    path = tmp_path / "query.mp4"
    path.write_bytes(sample["mp4"])
    return path, sample["__key__"]


def _own_window_on_top(results: list, key: str) -> bool:
    """The query's own window (its video, from 0 s) scores ~1 and is in the top tie set."""
    best = max(r["score"] for r in results)
    return any(r["video"] == key and r["start"] == 0.0 and r["score"] > 0.99 and r["score"] >= best - 1e-4
               for r in results)


@pytest.mark.parametrize("kind", ["xclip", "open_clip"])
def test_video_text_model_end_to_end(kind, imported, last_val_shard, tmp_path, capsys):
    source, model = imported(kind)
    check = _check(model)
    assert check["passed"] and set(check) >= {"video", "text"}
    assert check["video"] <= 1e-4 and check["text"] <= 1e-4
    config = json.loads((model / "config.json").read_text())
    assert config["kind"] == "imported" and config["spaces"] == {"video": ["vat"], "text": ["vat"]}
    assert config["sampling"]["num_frames"] == (4 if kind == "xclip" else 8) and config["sampling"]["size"] == 32
    features = _extract(capsys, model, last_val_shard, tmp_path / "f.safetensors")
    assert features["video_vat"].shape[0] == 4 and features["text_vat"].shape[0] >= 4
    assert torch.allclose(features["video_vat"].norm(dim=-1), torch.ones(4), atol=1e-5)
    code, out, err = run_cli(capsys, "eval", "zeroshot", model, "--data", tmp_path / "f.safetensors", "--task", "demo",
                             "--out", tmp_path / "zs")
    assert code == 0, err
    report = json.loads((tmp_path / "zs" / "report.json").read_text())
    assert report["num_samples"] == 4 and report["chance_top1"] == pytest.approx(20.0) and 0 <= report["top1"] <= 100
    results = _index_and_search(capsys, model, last_val_shard, tmp_path, "a red circle")
    assert len(results) == 3 and all(-1.0 - 1e-5 <= r["score"] <= 1.0 + 1e-5 for r in results)


def test_xclip_records_its_processor_and_tokenizer(imported):
    from transformers import AutoTokenizer

    from mmvssl import load_model
    from mmvssl.evaluation.features import eval_spec
    from mmvssl.models.imported.tokenizer import PAD
    source, folder = imported("xclip")
    model = load_model(folder)
    pre = model.config["preprocess"]
    assert pre["from"] == "preprocessor_config.json"
    assert pre["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    spec = eval_spec(model)
    assert (spec.num_frames, spec.size, spec.fps) == (4, 32, 4.0)
    ids = model.text_tokenizer()(["a red circle", "blue"])
    theirs = AutoTokenizer.from_pretrained(source)(["a red circle", "blue"])["input_ids"]
    assert ids.shape == (2, spec.context_length)
    for row, own in zip(ids.tolist(), theirs):
        assert row[:len(own)] == own and set(row[len(own):]) <= {PAD}


def test_clap_audio_text_end_to_end(imported, last_val_shard, tmp_path, capsys):
    source, model = imported("clap")
    check = _check(model)
    assert check["passed"] and check["audio"] <= 1e-4 and check["text"] <= 1e-4 and "video" not in check
    config = json.loads((model / "config.json").read_text())
    assert config["sampling"]["audio_rate"] == 16000 and config["spaces"] == {"audio": ["vat"], "text": ["vat"]}
    features = _extract(capsys, model, last_val_shard, tmp_path / "f.safetensors")
    assert {"audio_vat", "text_vat"} <= set(features) and "video_vat" not in features
    code, out, err = run_cli(capsys, "eval", "zeroshot", model, "--data", tmp_path / "f.safetensors", "--task", "demo",
                             "--modality", "audio", "--out", tmp_path / "zs")
    assert code == 0, err
    # audio -> audio search: the query is the first sample's own soundtrack
    query, key = _a_video(last_val_shard, tmp_path)
    results = _index_and_search(capsys, model, last_val_shard, tmp_path, "--audio", query, "--start", "0", "--end", "2")
    assert _own_window_on_top(results, key)


@pytest.mark.parametrize("kind", ["videomae", "vjepa2", "timesformer", "vivit", "clip", "siglip"])
def test_more_sources_import_check_extract_and_search(kind, imported, last_val_shard, tmp_path, capsys):
    source, model = imported(kind)
    check = _check(model)
    assert check["passed"] and check["video"] <= 1e-4
    assert ("text" in check) == (kind in ("clip", "siglip"))
    features = _extract(capsys, model, last_val_shard, tmp_path / "f.safetensors")
    space = "video_vat" if kind in ("clip", "siglip") else "video_ssl"
    assert features[space].shape[0] == 4
    code, out, err = run_cli(capsys, "eval", "zeroshot", model, "--data", tmp_path / "f.safetensors", "--task", "demo",
                             "--out", tmp_path / "zs")
    if kind in ("clip", "siglip"):
        assert code == 0, err
    else:  # no text tower: one line naming what is missing
        assert code == 2 and "video_vat" in err and len(err.strip().splitlines()) == 1
    query, key = _a_video(last_val_shard, tmp_path)
    results = _index_and_search(capsys, model, last_val_shard, tmp_path, "--video", query, "--start", "0", "--end", "1")
    assert _own_window_on_top(results, key)  # its own window


def test_vivit_records_its_offset_rescale(imported):
    _, folder = imported("vivit")
    pre = json.loads((folder / "config.json").read_text())["preprocess"]
    assert pre["rescale"] == pytest.approx(1 / 127.5) and pre["offset"] == -1.0 and pre["mean"] == [0.5, 0.5, 0.5]


def test_check_fails_when_the_weights_differ(imported, tmp_path):
    from mmvssl import load_model
    from mmvssl.errors import MmvsslError
    from mmvssl.models.imported.check import check_import
    source, folder = imported("xclip")
    model = load_model(folder)
    with torch.no_grad():
        weight = model.encoders["video"].visual_projection.weight
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(MmvsslError, match="video embedding differs"):
        check_import(model, source, tmp_path)
    report = json.loads((tmp_path / "check.json").read_text())
    assert not report["passed"] and report["video"] > 1e-4 and report["text"] <= 1e-4


def test_unsupported_sources_stop_with_one_line(tmp_path, capsys):
    import transformers as tf
    tf.BertModel(tf.BertConfig(vocab_size=32, **TINY)).save_pretrained(str(tmp_path / "bert"))
    code, _, err = run_cli(capsys, "models", "import", tmp_path / "bert", "--out", tmp_path / "m")
    assert code == 2 and "model type 'bert' cannot be imported" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "models", "import", tmp_path / "nowhere", "--out", tmp_path / "m")
    assert code == 2 and "not a transformers model folder" in err


# ---- joined models: BASE + towers of other sources, each in its own space (mmvssl/models/imported/combined.py)

def _scores(results: list) -> dict:
    return {(r["video"], r["start"]): r["score"] for r in results}


def test_xclip_with_clap_serves_text_and_audio_search_in_one_index(imported, last_val_shard, tmp_path, capsys):
    from mmvssl import load_model
    xclip_src, xclip = imported("xclip")
    clap_src, clap = imported("clap")
    combo = tmp_path / "xclip+clap"
    code, out, err = run_cli(capsys, "models", "import", xclip_src, "--audio", clap_src, "--text", clap_src,
                             "--out", combo, "--check")
    assert code == 0, err
    config = json.loads((combo / "config.json").read_text())
    assert config["kind"] == "combined"
    assert config["spaces"] == {"video": ["vat"], "text": ["vat", "clap"], "audio": ["clap"]}
    assert config["sampling"] == {"num_frames": 4, "fps": 4.0, "size": 32, "audio_rate": 16000}  # X-CLIP's clip
    check = _check(combo)
    assert check["passed"] and set(check["parts"]) == {"base", "clap"}
    assert max(check["video"], check["audio"], check["text"]) <= 1e-4

    # each space is its part's own: the joined model embeds exactly as X-CLIP alone and CLAP alone
    model, alone_x, alone_c = load_model(combo), load_model(xclip), load_model(clap)
    texts = ["a red circle moves left", "the sound of a blue square"]
    tokens = model.text_tokenizer()(texts)
    assert tokens.shape == (2, alone_x.config["text"]["context_length"] + alone_c.config["text"]["context_length"])
    wave = torch.rand(2, 16000, generator=torch.Generator().manual_seed(0)) - 0.5
    with torch.no_grad():
        pairs = [(model.encode_text(tokens, "vat"), alone_x.encode_text(alone_x.text_tokenizer()(texts), "vat")),
                 (model.encode_text(tokens, "clap"), alone_c.encode_text(alone_c.text_tokenizer()(texts), "vat")),
                 (model.encode_audio(wave, "clap"), alone_c.encode_audio(wave, "vat"))]
    for ours, theirs in pairs:  # the same modules on the same input; 1e-5 leaves room for kernel choices
        assert (ours - theirs).abs().max() <= 1e-5
    with pytest.raises(Exception, match="embeds audio in clap, not 'vat'"):
        model.encode_audio(wave, "vat")  # no space holds CLAP's audio and X-CLIP's video

    # one index: text -> video through X-CLIP, audio -> video through the windows' soundtracks in CLAP's space
    code, _, err = run_cli(capsys, "index", "build", combo, "--input", last_val_shard, "--out", tmp_path / "index",
                           "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "search", tmp_path / "index", "a red circle", "-k", "100", "--json")
    assert code == 0, err
    by_text = json.loads(out)
    code, _, err = run_cli(capsys, "index", "build", xclip, "--input", last_val_shard, "--out", tmp_path / "x",
                           "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "search", tmp_path / "x", "a red circle", "-k", "100", "--json")
    alone = json.loads(out)  # X-CLIP alone, the same windows
    assert _scores(by_text).keys() == _scores(alone).keys() and len(by_text) >= 4
    for where, score in _scores(alone).items():
        assert _scores(by_text)[where] == pytest.approx(score, abs=1e-5)
    query, key = _a_video(last_val_shard, tmp_path)
    code, out, err = run_cli(capsys, "search", tmp_path / "index", "--audio", query, "--start", "0", "--end", "1",
                             "-k", "3", "--json")
    assert code == 0, err
    assert _own_window_on_top(json.loads(out), key)


def test_pairings_without_a_shared_space_are_refused(imported, tmp_path, capsys):
    xclip_src, _ = imported("xclip")
    clap_src, _ = imported("clap")
    videomae_src, _ = imported("videomae")
    cases = [(["--text", clap_src], "a text tower alone would be the only tower"),
             (["--video", clap_src], "clap has no video tower"),
             (["--video", videomae_src], "its clips are 4 frames at 7.5 fps, 32 px, BASE's are 4 frames at 4 fps"),
             (["--video", xclip_src], "that is BASE itself")]
    for extra, message in cases:
        code, _, err = run_cli(capsys, "models", "import", xclip_src, *extra, "--out", tmp_path / "m")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "m").exists()


# ---- training from an imported model: finetune, and pretrain's model.init_from

TRAIN_TINY = ["data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "train.warmup_steps=1",
              "train.log_every=1", "train.save_every=0", "train.log_with=none", "train.max_steps=2"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_finetune_an_imported_videomae_and_the_classifier_reloads(imported, demo_shards, last_val_shard, tmp_path,
                                                                  capsys):
    from mmvssl import load_model
    from mmvssl.evaluation.classifier import classify_shards
    from mmvssl.evaluation.features import ExtractOptions
    from mmvssl.models.classifier import load_classifier
    from mmvssl.models.imported import ImportedModel
    _, folder = imported("videomae")
    out = tmp_path / "ft"
    code, stdout, err = run_cli(capsys, "finetune", folder, "--train", demo_shards["train"], "--test", last_val_shard,
                                "--task", "demo", "--out", out, "--clips", "1", "--crops", "1",
                                "--set", *TRAIN_TINY, "method.options.eval_every=0", "train.lr=1e-2")
    assert code == 0, err
    assert "top1" in stdout
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["kind"] == "imported" and config["sampling"]["num_frames"] == 4
    assert isinstance(load_model(out / "model"), ImportedModel)
    before, after = _weights(folder), _weights(out / "model")
    assert before.keys() == after.keys()
    moved = [k for k in before if k.startswith("encoders.video.") and not torch.equal(before[k], after[k])]
    assert moved  # the source's own modules were trained
    options = ExtractOptions(num_clips=1, num_crops=1)
    first = classify_shards(load_classifier(out / "model"), str(last_val_shard), options)
    again = classify_shards(load_classifier(out / "model"), str(last_val_shard), options)
    torch.testing.assert_close(first["scores"], again["scores"])
    assert first["scores"].shape == (4, 5)


def _xclip_pretrain_config(tmp_path: Path, shards: Path) -> Path:
    path = tmp_path / "xclip.yaml"
    path.write_text(f"""
data: {{shards: {shards}, num_frames: 4, fps: 4.0, size: 32, context_length: 16, num_candidates: 2}}
objective:
  terms: [{{name: vt_milnce, loss: mil_nce, inputs: [video_vat, text_vat], weight: 1.0}}]
train: {{output_dir: {tmp_path / 'run'}, lr: 1.0e-2}}
""")
    return path


def test_pretrain_starts_from_an_imported_xclip_and_reads_its_tokenizer(imported, demo_shards, tmp_path, capsys):
    from mmvssl import load_model
    _, folder = imported("xclip")
    config = _xclip_pretrain_config(tmp_path, demo_shards["train"])
    # the tiny X-CLIP's vocabulary has 36 words: CLIP's BPE ids would fall outside its embedding table,
    # so a run that trains at all read the captions with the model's own tokenizer
    code, _, err = run_cli(capsys, "pretrain", config, f"model.init_from={folder}", *TRAIN_TINY)
    assert code == 0, err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    trained = load_model(tmp_path / "run" / "model")
    assert trained.config["kind"] == "imported"
    before, after = _weights(folder), _weights(tmp_path / "run" / "model")
    for tower in ("encoders.video.", "encoders.text."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(tower)), tower
    code, _, err = run_cli(capsys, "pretrain", config, f"model.init_from={folder}", "data.num_frames=8", *TRAIN_TINY)
    assert code == 2 and "takes clips of 4 frames (its position table), not data.num_frames=8" in err
    assert len(err.strip().splitlines()) == 1


def test_init_from_a_trained_folder_loads_matching_weights_and_names_a_mismatch(tmp_path):
    from mmvssl import create_model
    from mmvssl.config import load_config
    from mmvssl.errors import ConfigError
    from mmvssl.methods.contrastive import build_student
    torch.manual_seed(1)
    create_model("video-tiny").save_pretrained(tmp_path / "trained")
    saved = _weights(tmp_path / "trained")
    cfg = load_config("configs/demo/tiny.yaml", ["model.preset=video-tiny", "model.overrides={}",
                                                 f"model.init_from={tmp_path / 'trained'}"])
    net = build_student(cfg)
    assert net.state_dict().keys() == saved.keys()
    assert all(torch.equal(net.state_dict()[k], saved[k]) for k in saved)  # copies of the saved tensors
    cfg = load_config("configs/demo/tiny.yaml", [f"model.init_from={tmp_path / 'trained'}"])  # vatt-tiny, conv stem
    with pytest.raises(ConfigError, match="does not match model.preset 'vatt-tiny'"):
        build_student(cfg)
