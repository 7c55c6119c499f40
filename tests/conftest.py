"""Shared fixtures: small generated videos, a tiny demo dataset and its shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def pytest_collection_modifyitems(session, config, items):
    """The environment checks (tests/test_environment.py) run before everything else."""
    items.sort(key=lambda item: item.get_closest_marker("environment") is None)  # stable sort


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A broken environment stops the session after its own failure: with a torchaudio built
    against another torch, the one failing check names both versions, and the rest of the suite,
    which would only fail again for the same reason, does not run."""
    report = yield
    if report.failed and item.get_closest_marker("environment"):
        item.session.shouldstop = f"the installed environment is broken ({item.name}); see its message above"
    return report


def make_video(path, seconds: float = 3.0, fps: int = 10, size=(96, 80), audio_rate: int | None = 16000,
               tone_hz: float = 440.0, codec: str = "libx264", container_format: str | None = None) -> Path:
    """A video whose red channel ramps with the frame index (frame i has red = 255 * i / n)
    and, when audio_rate is set, a mono sine tone of tone_hz (Opus at 48 kHz beside VP9)."""
    from tests.helpers_data.media import make_media
    vp9 = codec == "libvpx-vp9"
    audio_codec = None if not audio_rate else ("libopus" if vp9 else "aac")
    return make_media(path, codec=codec, container_format=container_format, size=size, fps=fps, seconds=seconds,
                      audio_codec=audio_codec, audio_rate=48000 if vp9 else (audio_rate or 16000),
                      tone_hz=tone_hz, mark=False)


@pytest.fixture
def video_factory():
    return make_video


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small procedural dataset (train + val) shared by the data, training and eval tests."""
    from mmvssl.data.synth import make_synthetic_dataset
    root = tmp_path_factory.mktemp("demo") / "data"
    make_synthetic_dataset(root, seed=0, num_train=24, num_val=12, seconds=3.0)
    return root


@pytest.fixture(scope="session")
def demo_shards(demo_data, tmp_path_factory) -> dict:
    from mmvssl.data.shards import build_shards
    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        build_shards(demo_data / split, out / split, captions=demo_data / split / "captions.jsonl", samples_per_shard=8)
    return {"train": out / "train", "val": out / "val"}


@pytest.fixture(scope="session")
def val_shards_with_extra_members(demo_shards, tmp_path_factory) -> Path:
    """The demo val shards, each sample with two more members: a gzipped one (`notes.txt.gz`) and
    raw bytes (`extra.bin`); tools that rewrite shards must carry both over byte for byte."""
    import gzip
    import webdataset as wds
    out = tmp_path_factory.mktemp("extra-members")
    urls = sorted(map(str, Path(demo_shards["val"]).glob("*.tar")))
    with wds.TarWriter(str(out / "shard-000000.tar"), encoder=False) as writer:
        for sample in wds.WebDataset(urls, shardshuffle=False):
            key = sample["__key__"]
            writer.write({"__key__": key, **{k: v for k, v in sample.items() if not k.startswith("__")},
                          "notes.txt.gz": gzip.compress(f"notes of {key}".encode()), "extra.bin": bytes(range(7))})
    return out


def raw_samples(folder) -> list[dict]:
    """Every sample of the shards in `folder`, members as their stored bytes."""
    import webdataset as wds
    return list(wds.WebDataset(sorted(map(str, Path(folder).glob("*.tar"))), shardshuffle=False))


def load_eval_script(name: str):
    """eval/<name>.py as a module (the eval scripts are not a package)."""
    import importlib.util
    from mmvssl.resources import data_path
    spec = importlib.util.spec_from_file_location(name, data_path("eval", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_local_nodes(argv: list[str], env: dict, cwd, port: int, timeout: float = 300) -> list[tuple[str, str]]:
    """docs/distributed.md's several-nodes form on this machine: two torchrun agents, `--nnodes 2
    --node_rank 0|1 --nproc_per_node 1`, meeting at 127.0.0.1:port, each running `-m mmvssl.cli ARGV`;
    asserts both exit 0 and returns each node's (stdout, stderr)."""
    import subprocess
    import sys
    nodes = [subprocess.Popen([str(Path(sys.executable).parent / "torchrun"), "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "mmvssl.cli", *map(str, argv)],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    return outputs


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def trained_run(demo_shards, tmp_path_factory) -> Path:
    """A few steps of pretraining on the demo shards (run folder with model/ and checkpoints/)."""
    from mmvssl.config import load_config
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(data_path("configs", "demo", "tiny.yaml"), [
        f"data.shards={demo_shards['train']}", "data.batch_size=4", "data.num_workers=0",
        "train.max_steps=4", "train.save_every=2", "train.log_every=1", "train.warmup_steps=1",
        f"train.output_dir={out}"])
    pretrain(cfg)
    return out
