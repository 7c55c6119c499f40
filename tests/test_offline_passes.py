"""Offline passes on many processes (issue 26): `torchrun --nproc_per_node 2 -m mmvssl.cli PASS ...`
splits the input shards over the processes and writes what one process writes (shards byte for
byte, the same report, the same JSON lines after sorting); a killed process's shards are redone
by the next run, no others. mmvssl/data/workshare.py is the one place that knows the processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmvssl.data.workshare import Share
from mmvssl.errors import MmvsslError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_share_without_torchrun_is_one_process(clean_env):
    share = Share.from_env()
    assert (share.rank, share.world, share.is_main) == (0, 1, True)
    assert share.mine(["a", "b", "c"]) == ["a", "b", "c"]
    share.barrier()  # no process group for one process
    assert share.gather_objects({"n": (1, 2)}) == [{"n": [1, 2]}]  # JSON's view of the object
    share.close()


def test_share_splits_item_i_to_rank_i_mod_world(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", "1")
    items = ["s0", "s1", "s2", "s3", "s4"]
    shares = []
    for rank in (0, 1):
        clean_env.setenv("RANK", str(rank))
        shares.append(Share.from_env())
    assert shares[0].mine(items) == ["s0", "s2", "s4"] and shares[1].mine(items) == ["s1", "s3"]
    assert [i for i in range(5) if shares[1].owns(i)] == [1, 3]
    assert shares[0].is_main and not shares[1].is_main


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "WORLD_SIZE=2 says several processes, but RANK is not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2 is outside 0..1"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR, MASTER_PORT are not set"),
    ({"RANK": "1"}, "RANK=1 but WORLD_SIZE is unset"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
])
def test_share_inconsistent_env_is_one_line(clean_env, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(MmvsslError, match=message):
        Share.from_env()


# ---- the passes under torchrun, against one process ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 ARGS` on this machine (gloo, one thread per process)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def three_shards(demo_shards, tmp_path_factory) -> Path:
    """The demo val set (12 samples, 3 s videos) cut into 3 shards of 4: uneven over 2 processes."""
    import webdataset as wds
    from mmvssl.data.rawsample import read_shard, stored_members
    out = tmp_path_factory.mktemp("three") / "in"
    out.mkdir()
    samples = [r for u in sorted(demo_shards["val"].glob("*.tar")) for r in read_shard(str(u))]
    for s in range(3):
        with wds.TarWriter(str(out / f"shard-{s:06d}.tar"), encoder=False) as w:
            for raw in samples[4 * s:4 * s + 4]:
                w.write({"__key__": raw["__key__"], **stored_members(raw)})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_shards) -> dict:
    from tests.helpers.tiny_teacher import save_tiny_teacher
    from tests.test_narrator import save_untrained_narrator
    from tests.test_rephrase import t5_dir
    root = tmp_path_factory.mktemp("models")
    arch, weights = save_tiny_teacher(root / "teacher", seed=0)
    torch.manual_seed(0)
    narrator = save_untrained_narrator(root)
    return {"teacher": f"{arch}:{weights}", "narrator": narrator,
            "t5": str(t5_dir.__wrapped__(demo_shards, tmp_path_factory))}


def _commands(inp: Path, out: Path, models: dict) -> list[list[str]]:
    """Each pass once, small settings; rephrase cuts its output from the stream (parts of 5 samples)."""
    return [
        ["shards", "add-features", models["teacher"], "--shards", str(inp), "--out", str(out / "features"),
         "--fps", "2", "--size", "32", "--batch-size", "5", "--device", "cpu"],
        ["shards", "add-flow", "--shards", str(inp), "--out", str(out / "flow"), "--fps", "2", "--size", "32"],
        ["rephrase", models["t5"], "--shards", str(inp), "--out", str(out / "rephrased"), "--k", "2",
         "--max-length", "6", "--samples-per-shard", "5"],
        ["narrate", models["narrator"], "--input", str(inp), "--out", str(out / "narrations.jsonl"),
         "--shards-out", str(out / "pseudo"), "--num-candidates", "2", "--max-length", "5"],
    ]


def _one_process(commands: list[list[str]], monkeypatch) -> None:
    """The reference: the same command lines in this process, one thread (as each torchrun process)."""
    from mmvssl.cli import main
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for argv in commands:
            assert main(argv) == 0, argv
    finally:
        torch.set_num_threads(threads)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_write_what_one_process_writes(three_shards, models, tmp_path, monkeypatch):
    """add-features, add-flow, rephrase (parts cut from the stream) and narrate --shards-out under
    torchrun with 2 processes over 3 shards: every shard, sizes.json and report byte for byte as one
    process writes them, narrations.jsonl the same lines after sorting; nothing else left behind."""
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(_commands(three_shards, one, models), monkeypatch)
    spec = tmp_path / "commands.json"
    spec.write_text(json.dumps(_commands(three_shards, two, models)))
    result = _torchrun([str(ROOT / "tests" / "helpers" / "offline_passes.py"), str(spec)])
    for folder in ("features", "flow", "rephrased", "pseudo"):
        want, got = _files(one / folder), _files(two / folder)
        assert sorted(got) == sorted(want), folder  # no records of the processes left behind
        assert [n for n in want if n.endswith(".tar")], folder
        for name in want:
            assert got[name] == want[name], f"{folder}/{name}"
    assert sorted(json.loads(_files(one / "rephrased")["sizes.json"])) == [f"shard-{i:06d}.tar" for i in range(3)]
    lines = (one / "narrations.jsonl").read_text().splitlines()
    assert len(lines) == 12 and sorted((two / "narrations.jsonl").read_text().splitlines()) == sorted(lines)
    assert (two / "narrations.provenance.json").read_bytes() == (one / "narrations.provenance.json").read_bytes()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no rank files
    # rank 0 alone prints each summary, over all processes
    assert result.stdout.count("narrated 12 windows of 12 videos") == 1
    assert result.stdout.count("3 shards (0 finished before), 12 samples") == 2  # add-features, add-flow
