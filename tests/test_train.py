import json

import pytest
import torch

import mmvssl
from mmvssl.config import load_config, to_dict
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
    batch = {"video": torch.randn(8, 3, 4, 32, 32), "audio": torch.randn(8, 8000) * 0.1,  # small: fast
             "text": torch.randint(1, 5000, (8, 2, 16))}
    opt = build_optimizer(model, 1e-3, 0.0)
    losses = []
    for _ in range(15):
        loss, _ = objective(model(batch), batch)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.3 * losses[0]
    assert json.dumps(losses)  # finite numbers throughout


SMALL = ("data.size=32", "data.num_frames=4", "data.context_length=16")  # 1 s clips of 32 x 32: fast


def _tiny_cfg(shards, out, *overrides):
    return load_config(data_path("configs", "demo", "tiny.yaml"), [
        f"data.shards={shards}", "data.batch_size=4", "data.num_workers=0", "train.max_steps=4", "train.save_every=2",
        "train.log_every=1", "train.warmup_steps=1", f"train.output_dir={out}", *overrides])


def _curve(path):
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "data_wait")} for r in read_jsonl(path)]


def test_resume_after_a_signal_reproduces_the_uninterrupted_loss_curve(trained_run, demo_shards, tmp_path, monkeypatch):
    """SIGINT during step 3 of 4: the step finishes, a checkpoint is saved, the run returns; resumed,
    it logs exactly the losses of the uninterrupted run (the `trained_run` fixture, same config)."""
    import signal

    from mmvssl.losses import contrastive
    calls, real = [], contrastive.LOSSES["nce"]

    def signalling_nce(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setitem(contrastive.LOSSES, "nce", signalling_nce)
    run = tmp_path / "run"
    stopped_at = pretrain(_tiny_cfg(demo_shards["train"], run))
    assert stopped_at == run / "checkpoints" / "step_00000003"
    assert not (run / "model").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((stopped_at / "trainer_state.json").read_text())["batches_consumed"] == 3

    final = pretrain(_tiny_cfg(demo_shards["train"], run, "train.resume=latest"))
    assert final == run / "model" and len(calls) == 4
    resumed, uninterrupted = _curve(run / "metrics.jsonl"), _curve(trained_run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    # exact in practice: both runs do the same ops on the same inputs in this process (weights,
    # optimizer and RNG states come back from the checkpoint bit for bit); rel 1e-6 is far below
    # what a wrong resume changes (another batch, a lost optimizer state)
    for got, expected in zip(resumed, uninterrupted):
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-7), got["step"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(demo_shards, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mmvssl.cli", "pretrain", str(data_path("configs", "demo", "tiny.yaml")),
                             f"data.shards={demo_shards['train']}", "data.batch_size=2", "data.num_workers=0",
                             "train.max_steps=500", "train.save_every=0", "train.log_every=1", f"train.output_dir={out}",
                             "train.log_with=none", *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a bound, not a timing: the wait ends at the first logged step; a loaded machine may need minutes
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (
            (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    printed, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: saved" in printed and "Traceback" not in err
    [ckpt] = list_checkpoints(out / "checkpoints")
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert int(ckpt.name.split("_")[1]) == steps[-1] < 500
    demo = load_config(data_path("configs", "demo", "tiny.yaml"))
    model = mmvssl.create_model(demo.model.preset, **to_dict(demo.model.overrides))  # the demo's architecture
    opt = build_optimizer(model, 1e-3, 0.05)
    assert load_checkpoint(ckpt, model, opt, warmup_cosine(opt, 1, 500))["step"] == steps[-1]


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    import signal
    import subprocess
    import sys
    from mmvssl.train.checkpoint import resolve_resume
    root = tmp_path / "ck"
    script = f"""
import time, torch
import mmvssl.train.checkpoint as ck
from mmvssl.train.optim import build_optimizer, warmup_cosine
model = torch.nn.Linear(4, 4); opt = build_optimizer(model, 1e-3, 0.0); sched = warmup_cosine(opt, 1, 10)
ck.save_checkpoint({str(root)!r}, 1, model, opt, sched)
real = ck.save_file
def stalled(state, path, *args, **kwargs):
    real(state, path, *args, **kwargs)
    print("saving", flush=True)
    time.sleep(60)
ck.save_file = stalled
ck.save_checkpoint({str(root)!r}, 2, model, opt, sched)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"  # step 2 is half written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert list(root.glob(".tmp_*"))  # the interrupted save's debris
    latest = resolve_resume("latest", root)
    assert latest == root / "step_00000001"
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, 1e-3, 0.0)
    assert load_checkpoint(latest, model, opt, warmup_cosine(opt, 1, 10))["step"] == 1
    save_checkpoint(root, 3, model, opt, warmup_cosine(opt, 1, 10))
    assert not list(root.glob(".tmp_*"))  # the next save clears it


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(demo_shards, tmp_path, monkeypatch):
    from mmvssl.errors import MmvsslError
    from mmvssl.losses import contrastive
    calls, real = [], contrastive.LOSSES["nce"]

    def nan_on_second_call(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setitem(contrastive.LOSSES, "nce", nan_on_second_call)
    # also exercises feature-cached accumulation, learnable temperatures and EMA in the engine
    run = tmp_path / "a"
    pretrain(_tiny_cfg(demo_shards["train"], run, "train.max_steps=2", "train.accum_steps=2", *SMALL,
                       "objective.learnable_temperature=true", "train.ema_decay=0.9"))
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[-1]["bad_steps"] == 1 and len(calls) == 3
    assert records[-1]["temperature/va_nce"] != pytest.approx(0.07, abs=1e-9)  # it learnt
    [ckpt] = list_checkpoints(run / "checkpoints")
    assert (ckpt / "method.safetensors").is_file() and (ckpt / "ema.safetensors").is_file()
    assert mmvssl.load_model(run / "model_ema").config["name"] == "vatt-tiny"

    monkeypatch.setitem(contrastive.LOSSES, "nce", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(MmvsslError, match=r"loss term\(s\) va_nce not finite for 2 steps in a row.*last at step 1"):
        pretrain(_tiny_cfg(demo_shards["train"], tmp_path / "b", "train.max_bad_steps=2", *SMALL))


def test_optimizer_options_reach_adamw_and_the_schedule_floor():
    from mmvssl.config import load_config
    from mmvssl.train.optim import build_optimizer, warmup_cosine
    cfg = load_config(None, ["train.mixed_precision=no", "train.betas=[0.9,0.999]", "train.eps=1e-8",
                             "train.min_lr_ratio=0.5"])
    assert cfg.train.mixed_precision == "no"  # not YAML 1.1's false
    net = torch.nn.Linear(3, 3)
    opt = build_optimizer(net, 1.0, 0.1, betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-8
    sched = warmup_cosine(opt, 0, 10, cfg.train.min_lr_ratio)
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5)
