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
    """The reference: the same command lines in one process with one thread (as each torchrun
    process). A subprocess: torch.set_num_threads(1) and back in the test process does not return
    MKL / OpenMP to their first state, and every later test's floats move."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    script = "import json, sys\nfrom mmvssl.cli import main\nfor argv in json.loads(sys.argv[1]):\n" \
             "    assert main(argv) == 0, argv\n"
    result = subprocess.run([sys.executable, "-c", script, json.dumps([[str(a) for a in c] for c in commands])],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


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


def test_rewritten_bytes_do_not_depend_on_the_run():
    """The tar headers carry TAR_MTIME, not the clock; a safetensors member's header has its keys
    sorted (safetensors writes `__metadata__` from a hash map whose order varies between runs)."""
    import struct
    from safetensors.torch import save
    from mmvssl.fsio import stable_safetensors
    metadata = {f"key{i}": str(i) for i in range(12)}
    tensors = {"b": torch.arange(6, dtype=torch.uint8), "a": torch.ones(2, dtype=torch.float16)}
    made = [save(tensors, metadata=metadata) for _ in range(8)]
    stable = {stable_safetensors(m) for m in made}
    assert len(stable) == 1
    data = stable.pop()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    assert list(header["__metadata__"]) == sorted(metadata) and list(header) == sorted(header)
    from safetensors.torch import load
    assert all(torch.equal(load(data)[k], tensors[k]) for k in tensors)
    # the rewriter's own shards carry TAR_MTIME: checked on add-flow's output below


def test_a_killed_process_s_shards_are_redone_and_no_others(three_shards, tmp_path, monkeypatch, capsys):
    """Rank 0 of 2 finishes its shards (0 and 2 of 3) and the run is killed before the merge; rank 1
    left half a shard. The documented one-node command then redoes shard 1 only: shards 0 and 2 are
    not rewritten (same mtime), and the folder equals one process's, report and sizes.json included."""
    import tarfile
    from mmvssl.cli import main
    from mmvssl.data.rewrite import TAR_MTIME, ShardRewriter
    from mmvssl.data.workshare import Share
    ref, out = tmp_path / "ref", tmp_path / "out"
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert main(["shards", "add-flow", "--shards", str(three_shards), "--out", str(ref)]) == 0
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(Share, "barrier", lambda self: None)  # rank 1 is not there

    def killed(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(ShardRewriter, "finish", killed)
    assert main(["shards", "add-flow", "--shards", str(three_shards), "--out", str(out)]) == 130
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000002.tar"]
    assert sorted(p.name for p in (out / ".flow_report.json.parts").iterdir()) == [
        "shard-000000.tar.json", "shard-000002.tar.json"] and not (out / "flow_report.json").exists()
    (out / "shard-000001.tar.partial").write_bytes(b"half a shard")
    monkeypatch.setenv("WORLD_SIZE", "1")
    other = main(["shards", "add-flow", "--shards", str(three_shards), "--out", str(out), "--fps", "4"])
    assert other == 2 and "(a record of shard-000000.tar)" in capsys.readouterr().err  # other settings: refused
    kept = {n: (out / n).stat().st_mtime_ns for n in ("shard-000000.tar", "shard-000002.tar")}
    monkeypatch.undo()
    result = _torchrun(["-m", "mmvssl.cli", "shards", "add-flow", "--shards", str(three_shards), "--out", str(out)])
    assert result.stdout.count("3 shards (2 finished before), 12 samples") == 1
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert _files(out) == _files(ref)  # no records, no partial; shard 1 and the report as one process's
    with tarfile.open(out / "shard-000001.tar") as tar:
        assert {m.mtime for m in tar} == {TAR_MTIME}


def test_narrate_reads_back_and_merges_the_lines_of_a_killed_run(three_shards, models, tmp_path, monkeypatch):
    """A killed 2-process narrate left its rank files (one with a line cut short); a 1-process re-run
    counts their windows as done, narrates the rest, and merges: --out holds each window once,
    the lines of an uninterrupted run after sorting."""
    from mmvssl.cli import main
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    args = ["--input", str(three_shards), "--num-candidates", "2", "--max-length", "5"]
    # both runs in this process, on the same kernels (never change the thread count here: see _one_process)
    assert main(["narrate", models["narrator"], "--out", str(tmp_path / "ref.jsonl"), *args]) == 0
    lines = (tmp_path / "ref.jsonl").read_text().splitlines()
    parts = tmp_path / ".n.jsonl.parts"
    parts.mkdir()
    (parts / "rank-00000.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (parts / "rank-00001.jsonl").write_text(lines[5] + "\n" + lines[6][:20])  # killed mid-line
    assert main(["narrate", models["narrator"], "--out", str(tmp_path / "n.jsonl"), *args]) == 0
    assert sorted((tmp_path / "n.jsonl").read_text().splitlines()) == sorted(lines)
    assert not parts.exists()


def test_the_several_nodes_command_on_two_local_nodes(three_shards, tmp_path, monkeypatch):
    """The documented several-nodes form, as two torchrun agents (two 'nodes' of one process each)
    meeting at 127.0.0.1: the same folder as one process writes."""
    from mmvssl.cli import main
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["shards", "add-flow", "--shards", str(three_shards), "--out", str(ref)]) == 0
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    from tests.conftest import two_local_nodes
    outputs = two_local_nodes(["shards", "add-flow", "--shards", three_shards, "--out", out], env, ROOT,
                              _free_port(), timeout=400)
    assert "3 shards (0 finished before), 12 samples" in outputs[0][0] and not outputs[1][0]  # node 0 tells it
    assert _files(out) == _files(ref)
