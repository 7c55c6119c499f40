"""The documented multi-process launches, through the real command line: `accelerate launch
--config_file configs/accelerate/cpu.yaml -m mmvssl.cli pretrain` and torchrun on two nodes
(`--nnodes 2 --node_rank 0|1`, here two agents on 127.0.0.1) train two processes (gloo, CPU) whose
logged losses equal one process on the concatenated batch, step after step, and write one run folder
once; so does `torchrun --nproc_per_node 2` with a multi-view method (SimCLR's two views, negatives
gathered across views and processes); WORLD_SIZE without a launcher is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, two_local_nodes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 3

# A preset without BatchNorm (one linear head per modality into one space), so a clip's
# embedding does not depend on which process's batch it is in.
PRESET = """
name: ddp-tiny
video: {width: 64, depth: 1, heads: 2, patch: [2, 16, 16], num_frames: 4, image_size: 32, drop_token: 0.0}
audio: {width: 64, depth: 1, heads: 2, patch: 256, num_samples: 32000, drop_token: 0.0}
text: {width: 64, depth: 1, heads: 2, vocab_size: 49408, context_length: 16}
heads: {type: shared, dim: 32}
"""

# 2-s clips of 2-s videos (the window always starts at 0), no augmentation, epoch mode without a
# shuffle buffer: each process reads one 4-sample shard per step, and one process with batch 8
# reads both. Every step is a new epoch.
CONFIG = """
data: {{shards: {shards}, batch_size: 4, num_workers: 0, num_frames: 4, fps: 2.0, size: 32,
        context_length: 16, num_candidates: 2, mode: epoch, shuffle_buffer: 1}}
model: {{preset: {preset}}}
objective:
  temperature: 0.1
  terms:
    - {{name: va_nce, loss: nce, inputs: [video_vat, audio_vat], weight: 1.0}}
    - {{name: vt_milnce, loss: mil_nce, inputs: [video_vat, text_vat], weight: 1.0}}
train: {{max_steps: {steps}, lr: 3.0e-3, warmup_steps: 0, log_every: 1, save_every: 0, log_with: none, seed: 0}}
"""


# SimCLR on a video-only model without BatchNorm (linear patches, a one-layer projection head), two
# views of one window without augmentation (augmentations are drawn per process and worker).
SIMCLR_PRESET = """
name: ddp-video-tiny
video: {width: 64, depth: 1, heads: 2, patch: [2, 16, 16], num_frames: 4, image_size: 32, drop_token: 0.0}
heads: {type: projection, dim: 32, layers: 1}
"""
SIMCLR = """
method: {{name: simclr, options: {{temperature: 0.2}}}}
data: {{shards: {shards}, batch_size: 4, num_workers: 0, num_frames: 4, fps: 2.0, size: 32,
        mode: epoch, shuffle_buffer: 1, sampler: same, num_clips: 2}}
model: {{preset: {preset}}}
train: {{max_steps: {steps}, lr: 3.0e-3, warmup_steps: 0, log_every: 1, save_every: 0, log_with: none, seed: 0}}
"""


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    from mmvssl.data.shards import build_shards
    from mmvssl.data.synth import make_synthetic_dataset
    root = tmp_path_factory.mktemp("ddp-cli")
    make_synthetic_dataset(root / "data", seed=0, num_train=8, num_val=1, size=48, seconds=2.0)
    build_shards(root / "data" / "train", root / "shards", captions=root / "data" / "train" / "captions.jsonl",
                 samples_per_shard=4)
    assert len(list((root / "shards").glob("*.tar"))) == 2
    (root / "preset.yaml").write_text(PRESET)
    config = root / "config.yaml"
    config.write_text(CONFIG.format(shards=root / "shards", preset=root / "preset.yaml", steps=STEPS))
    (root / "simclr-preset.yaml").write_text(SIMCLR_PRESET)
    (root / "simclr.yaml").write_text(SIMCLR.format(shards=root / "shards", preset=root / "simclr-preset.yaml",
                                                    steps=STEPS))
    return config


@pytest.fixture(scope="module")
def one_process(run_config, tmp_path_factory) -> list[dict]:
    """The reference: one process, batch 8 = both shards = the two processes' batches together."""
    from mmvssl.config import load_config
    from mmvssl.train.engine import pretrain
    out = tmp_path_factory.mktemp("one")
    pretrain(load_config(run_config, ["data.batch_size=8", f"train.output_dir={out}"]))
    return read_jsonl(out / "metrics.jsonl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _assert_same_run(out: Path, result: subprocess.CompletedProcess, reference: list[dict],
                     keys=("loss", "va_nce", "vt_milnce"), name: str = "ddp-tiny") -> None:
    logged = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))  # written by one process, once
    # not bit for bit: the launches add the same float32 terms in another order (gathered logits,
    # DDP's average of two half-batch gradients) with one thread per process against the default
    # here: ~1e-7 relative per step, carried on by the optimizer (at most 5e-7 over the 3 steps,
    # measured with torch's AVX-512 kernels); rel 1e-4 keeps a wide margin over that and stays far
    # below a step's own change (the loss moves by > 1e-3 from step 1 to 3, asserted below)
    for got, want in zip(logged, reference):
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["step"], key)
        assert got["samples_per_s"] > 0
    # step 1 is computed before any update; steps 2 and 3 equal only if the gradients of the two
    # processes were combined exactly as one process's on the whole batch
    assert logged[-1]["loss"] != pytest.approx(logged[0]["loss"], rel=1e-3)
    assert (result.stdout + result.stderr).count("saved the model to") == 1
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{STEPS:08d}"]
    assert json.loads((out / "model" / "config.json").read_text())["name"] == name


def test_torchrun_on_two_nodes_equals_one_process(run_config, one_process, tmp_path):
    """docs/distributed.md's several-nodes command, one agent per node (here both on 127.0.0.1, one
    process each): two processes train as one process on their batches together. (The single-node
    form, `torchrun --nproc_per_node 2`, runs in the multi-view test below with the same check.)"""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    outputs = two_local_nodes(["pretrain", run_config, f"train.output_dir={out}"], env, ROOT, _free_port())
    both = subprocess.CompletedProcess([], 0, "".join(o for o, _ in outputs), "".join(e for _, e in outputs))
    _assert_same_run(out, both, one_process)


def test_accelerate_launch_cpu_config_equals_one_process(run_config, one_process, tmp_path):
    out = tmp_path / "run"
    result = _launch([str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu.yaml"),
                      "--main_process_port", str(_free_port()), "-m", "mmvssl.cli", "pretrain", str(run_config),
                      f"train.output_dir={out}"], out)
    _assert_same_run(out, result, one_process)


def test_multi_view_method_two_processes_equal_one_process(run_config, tmp_path):
    from mmvssl.config import load_config
    from mmvssl.train.engine import pretrain
    config = run_config.parent / "simclr.yaml"
    pretrain(load_config(config, ["data.batch_size=8", f"train.output_dir={tmp_path / 'one'}"]))
    reference = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    out = tmp_path / "run"
    result = _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                      "-m", "mmvssl.cli", "pretrain", str(config), f"train.output_dir={out}"], out)
    _assert_same_run(out, result, reference, keys=("loss", "nt_xent"), name="ddp-video-tiny")


def test_world_size_without_a_launcher_is_one_line_error(run_config, tmp_path, monkeypatch, capsys):
    from mmvssl.cli import main
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pretrain", str(run_config), f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "WORLD_SIZE=2" in err and "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set" in err
    assert not (tmp_path / "run").exists()  # stopped before writing anything


def test_gather_with_grad_backward_uses_only_all_reduce(monkeypatch):
    """The gather's backward asks the backend for nothing but all-reduce (gloo's reduce_scatter
    and all_to_all do not exist): with a fake 2-process world, the gradient of each process's
    slice is the sum of both processes' gathered gradients."""
    import torch
    import torch.distributed as dist
    from mmvssl.losses import gather

    other = torch.tensor([[10.0, 20.0]])  # what rank 1 holds
    upstream_other = torch.tensor([[1.0, 1.0], [2.0, 3.0]])  # rank 1's gradient w.r.t. the gathered tensor
    calls = []

    def all_gather(parts, x):
        calls.append("all_gather")
        parts[0].copy_(x)
        parts[1].copy_(other)

    def all_reduce(t, op=None):
        calls.append("all_reduce")
        t += upstream_other

    monkeypatch.setattr(gather, "world", lambda: (0, 2))
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for name in ("reduce_scatter", "all_to_all", "all_to_all_single"):
        monkeypatch.setattr(dist, name, lambda *a, **k: pytest.fail(f"{name} called"))
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    gathered = gather.gather_with_grad(x)  # (2, 2)
    assert gathered.tolist() == [[1.0, 2.0], [10.0, 20.0]]
    (gathered * torch.tensor([[3.0, 4.0], [5.0, 6.0]])).sum().backward()
    assert calls == ["all_gather", "all_reduce"]
    assert x.grad.tolist() == [[3.0 + 1.0, 4.0 + 1.0]]  # own rows of (own + other's) gradient
