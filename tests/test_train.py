import json

import pytest
import torch

import mmvssl
from mmvssl.config import load_config
from mmvssl.resources import data_path
from mmvssl.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mmvssl.train.engine import pretrain
from mmvssl.train.optim import build_optimizer, param_groups, warmup_cosine
from tests.conftest import read_jsonl


def test_pretrain_writes_metrics_checkpoints_and_a_loadable_model(trained_run):
    records = read_jsonl(trained_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"loss", "va_nce", "vt_milnce", "lr", "samples_per_s", "failed_samples"} <= set(r)
        assert r["loss"] == pytest.approx(r["va_nce"] + r["vt_milnce"], rel=1e-5)
    assert [p.name for p in list_checkpoints(trained_run / "checkpoints")] == ["step_00000002", "step_00000004"]
    assert (trained_run / "config.yaml").is_file() and (trained_run / "environment.json").is_file()
    model = mmvssl.load_model(trained_run / "model")
    assert model.config["sampling"] == {"num_frames": 8, "fps": 4.0, "size": 64, "audio_rate": 16000}


def test_resume_continues_from_the_latest_checkpoint(trained_run, demo_shards, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = load_config(data_path("configs", "demo", "tiny.yaml"), [
        f"data.shards={demo_shards['train']}", "data.batch_size=4", "data.num_workers=0", "train.max_steps=6",
        "train.log_every=1", f"train.output_dir={run}", "train.resume=latest", "train.save_every=0"])
    pretrain(cfg)
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # continued at 5, not restarted at 1


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = mmvssl.create_model("vatt-tiny")
    opt = build_optimizer(model, 1e-3, 0.05)
    sched = warmup_cosine(opt, 2, 10)
    model(dict(video=torch.randn(2, 3, 8, 64, 64)))["video_va"].sum().backward()
    opt.step()
    sched.step()
    path = save_checkpoint(tmp_path / "ck", 1, model, opt, sched)
    other = mmvssl.create_model("vatt-tiny")
    opt2 = build_optimizer(other, 1e-3, 0.05)
    sched2 = warmup_cosine(opt2, 2, 10)
    state = load_checkpoint(path, other, opt2, sched2)
    assert state["step"] == 1
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert not list(tmp_path.joinpath("ck").glob(".tmp_*"))  # no temporary left behind


def test_no_weight_decay_on_norms_biases_embeddings_and_positions():
    model = mmvssl.create_model("vatt-tiny")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "encoders.text.token_embed.weight" in no_decay_names
    assert "encoders.video.pos_t" in no_decay_names and "encoders.video.agg_token" in no_decay_names
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert "encoders.video.transformer.blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, max_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.5)
    assert lrs[-1] < 0.05


def test_training_fits_a_fixed_batch():
    """The model and objective can learn: optimising on one batch drives its loss down."""
    from mmvssl.losses.objective import Objective
    torch.manual_seed(0)
    model = mmvssl.create_model("vatt-tiny")
    objective = Objective([{"name": "va", "loss": "nce", "inputs": ["video_va", "audio_va"]},
                           {"name": "vt", "loss": "mil_nce", "inputs": ["video_vat", "text_vat"]}])
    batch = {"video": torch.randn(8, 3, 8, 64, 64), "audio": torch.randn(8, 32000) * 0.1,
             "text": torch.randint(1, 5000, (8, 2, 32))}
    opt = build_optimizer(model, 1e-3, 0.0)
    losses = []
    for _ in range(25):
        loss, _ = objective(model(batch), batch)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.3 * losses[0]
    assert json.dumps(losses)  # finite numbers throughout
