"""`mmvssl extract` and `mmvssl index build` on many processes (issue 26): `torchrun --nproc_per_node 2
-m mmvssl.cli ...` splits the shards (or a folder's videos) over the processes and writes what one
process writes: the same feature file (keys in the same order, the same tensors) and the same index
(rows, ids, thumbnails and vectors, compared by SQL). 3 shards (or 5 videos) over 2 processes: uneven,
and nothing hangs. A killed run's finished parts are reused by the next run, the rest redone."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmvssl.cli import main
from mmvssl.search import store
from tests.conftest import make_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from mmvssl.models.presets import create_model
    out = tmp_path_factory.mktemp("offline-model") / "vatt-tiny"
    torch.manual_seed(0)
    create_model("vatt-tiny").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """5 short clips (1 to 2 s, their own tones, some captioned) and a file that is not a video, in a
    folder; the clips in 3 shards of 2, 2 and 1 samples."""
    from mmvssl.data.shards import build_shards
    root = tmp_path_factory.mktemp("offline-inputs")
    for i in range(5):
        make_video(root / "clips" / f"clip{i}.mp4", seconds=1.0 + 0.25 * i, fps=8, size=(64, 48),
                   tone_hz=300 + 200 * i)
    captions = root / "captions.jsonl"  # two captions, one, or none: text rows that are not one per sample
    captions.write_text("\n".join(json.dumps({"video": f"clip{i}.mp4", **text}) for i, text in enumerate(
        [{"captions": ["a red ramp", "a low tone"]}, {"caption": "clip one"}, {}, {"caption": "clip three"}, {}])))
    build_shards(root / "clips", root / "shards", captions=captions, samples_per_shard=2)
    (root / "clips" / "clip9.mp4").write_bytes(b"not a video at all")  # rejected by the index
    assert len(list((root / "shards").glob("*.tar"))) == 3
    return {"clips": root / "clips", "shards": root / "shards"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv, script: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The real command line under torchrun, 2 processes on CPU (gloo), one thread each (`script`:
    a file that patches mmvssl, then runs the command line)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *([script] if script else ["-m", "mmvssl.cli"]),
               *map(str, argv)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def one_process(*argv) -> None:
    """The same command line in one process with one thread, as each torchrun process has (the same
    kernels). A subprocess: torch.set_num_threads(1) and back in the test process does not return
    MKL / OpenMP to their first state, and every later test's floats move (a session fixture's
    reference then differs from a run made after it, by ~1e-5)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "mmvssl.cli", *map(str, argv)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def read_features(path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file
    return json.loads(path.with_suffix(".json").read_text()), load_file(str(path))


def test_extract_on_two_processes_writes_the_one_process_file(model, inputs, tmp_path, capsys):
    # batch 3 over shards of 2, 2, 1: batches of one shard each ([2], [2], [1]) in both runs
    one_process("extract", model, "--data", inputs["shards"], "--out", tmp_path / "one.safetensors",
                "--batch-size", 3)
    result = torchrun("extract", model, "--data", inputs["shards"], "--out", tmp_path / "two.safetensors",
                      "--batch-size", 3)
    assert result.stdout.count("5 samples (0 failed to decode)") == 1  # rank 0 reports, once
    side_one, tensors_one = read_features(tmp_path / "one.safetensors")
    side_two, tensors_two = read_features(tmp_path / "two.safetensors")
    assert side_two["keys"] == side_one["keys"] and len(side_one["keys"]) == 5
    assert len(side_one["text_captions"]) == 4
    assert side_two == side_one  # captions, sources, metas, text rows, info
    assert tensors_two.keys() == tensors_one.keys() and {"video_va", "audio_va", "text_owner"} <= set(tensors_one)
    for name, x in tensors_one.items():  # the same code on the same batches: the same floats
        assert torch.equal(tensors_two[name], x), name
    assert not list(tmp_path.glob(".*.parts"))  # the parts are gone once the file is written


def test_a_killed_extract_redoes_only_the_shards_without_a_part(model, inputs, tmp_path, monkeypatch):
    import mmvssl.evaluation.features as F
    from mmvssl.evaluation.features import ExtractOptions, extract_to_file, parts_folder
    from mmvssl.models.presets import load_model
    net, out, options = load_model(model), tmp_path / "f.safetensors", ExtractOptions(batch_size=3)
    reference = extract_to_file(net, str(inputs["shards"]), tmp_path / "ref.safetensors", options)
    write_part = F._write_part

    def killed_after_the_first_part(path, header, part):
        write_part(path, header, part)
        raise KeyboardInterrupt  # the process dies after shard 0's part is written

    monkeypatch.setattr(F, "_write_part", killed_after_the_first_part)
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(net, str(inputs["shards"]), out, options)
    assert not out.exists() and len(list(parts_folder(out).iterdir())) == 1
    monkeypatch.setattr(F, "_write_part", write_part)
    shard_parts, redone = F.shard_parts, []

    def recording(model, shards, *a, **k):
        redone.extend(i for i, _ in shards)
        return shard_parts(model, shards, *a, **k)

    monkeypatch.setattr(F, "shard_parts", recording)
    again = extract_to_file(net, str(inputs["shards"]), out, options)
    assert redone == [1, 2]  # shard 0's part was kept
    assert again["keys"] == reference["keys"]
    for name in ("video_va", "audio_vat", "text_vat"):  # this process's thread count in both runs
        assert torch.equal(again[name], reference[name]), name
    assert not parts_folder(out).exists()


def dump_index(folder: Path) -> dict:
    """Every row of the index database (ids, thumbnails and vector bytes included), in id order."""
    db = sqlite3.connect(folder / store.DB_NAME)
    tables = {
        "roots": "SELECT id, path, kind FROM roots ORDER BY id",
        "videos": "SELECT id, root_id, source, shard, member, sha256, duration FROM videos ORDER BY id",
        "windows": 'SELECT id, video_id, start, "end", thumb, narration, narration_score FROM windows ORDER BY id',
        "vectors": "SELECT window_id, space, vec FROM vectors ORDER BY window_id, space",
        "rejected": "SELECT root_id, source, reason FROM rejected ORDER BY rowid",
        "info": "SELECT key, value FROM info ORDER BY key",
    }
    rows = {name: db.execute(sql).fetchall() for name, sql in tables.items()}
    db.close()
    return rows


INDEX_OPTIONS = ["--window", "0.5", "--batch-size", "3", "--quiet"]  # 2 to 4 windows per video

# run under torchrun: rank 0 dies (SIGKILL) right after writing its first part; every process logs
# the units it embeds into LOG.<rank>
PATCHED_CLI = """
import os, signal, sys
import mmvssl.search.index as I
from mmvssl.cli import main
log, kill = os.environ["LOG"] + "." + os.environ["RANK"], os.environ.get("KILL") == os.environ["RANK"]
scan_unit, write_part = I.scan_unit, I._write_part
def logged(source, kind, unit):
    with open(log, "a") as f:
        f.write(unit + "\\n")
    return scan_unit(source, kind, unit)
def killing(*a, **k):
    write_part(*a, **k)
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
I.scan_unit, I._write_part = logged, killing
sys.exit(main(sys.argv[1:]))
"""


def assert_same_index(folder: Path, reference: Path, rejected: int) -> None:
    one, two = dump_index(reference), dump_index(folder)
    assert len(one["videos"]) == 5 and len(one["windows"]) >= 10 and one["vectors"]
    assert len(one["rejected"]) == rejected
    for table in one:
        assert two[table] == one[table], table  # info holds each faiss file's sha256 too
    assert json.loads((folder / "build_report.json").read_text()) == \
        json.loads((reference / "build_report.json").read_text())
    assert not (folder / ".parts").exists()


def test_index_build_of_a_folder_on_two_processes_writes_the_one_process_index(model, inputs, tmp_path):
    one_process("index", "build", model, "--input", inputs["clips"], "--out", tmp_path / "one", *INDEX_OPTIONS)
    result = torchrun("index", "build", model, "--input", inputs["clips"], "--out", tmp_path / "two", *INDEX_OPTIONS)
    assert result.stdout.count("indexed 5 videos") == 1, result.stdout  # rank 0 reports, once
    assert_same_index(tmp_path / "two", tmp_path / "one", rejected=1)  # the file that is not a video
    # rank 0 alone opens the database; its refusal reaches the other process, and both stop on one line
    refused = torchrun("index", "build", model, "--input", inputs["clips"], "--out", tmp_path / "two", "--window",
                       "0.25", "--quiet", check=False)
    assert refused.returncode != 0
    assert refused.stderr.count("mmvssl: error: index") == 2 and "was built with other settings" in refused.stderr


def test_a_killed_index_build_of_shards_resumes_to_the_one_process_index(model, inputs, tmp_path, monkeypatch):
    one_process("index", "build", model, "--input", inputs["shards"], "--out", tmp_path / "one", *INDEX_OPTIONS)
    script = tmp_path / "patched_cli.py"
    script.write_text(PATCHED_CLI)
    shards = sorted(str(p) for p in inputs["shards"].glob("*.tar"))  # first run: rank 0 takes shards 0 and 2
    monkeypatch.setenv("LOG", str(tmp_path / "first"))
    monkeypatch.setenv("KILL", "0")
    killed = torchrun("index", "build", model, "--input", inputs["shards"], "--out", tmp_path / "two", *INDEX_OPTIONS,
                      script=script, check=False)
    assert killed.returncode != 0
    kept = sorted(p.name for p in (tmp_path / "two" / ".parts").glob("part-*.safetensors"))
    assert "part-000000.safetensors" in kept and "part-000002.safetensors" not in kept
    monkeypatch.setenv("LOG", str(tmp_path / "second"))
    monkeypatch.setenv("KILL", "none")
    torchrun("index", "build", model, "--input", inputs["shards"], "--out", tmp_path / "two", *INDEX_OPTIONS,
             script=script)
    redone = sorted(line for rank in (0, 1) if (tmp_path / f"second.{rank}").exists()
                    for line in (tmp_path / f"second.{rank}").read_text().split())
    assert redone == [u for i, u in enumerate(shards) if f"part-{i:06d}.safetensors" not in kept]
    assert_same_index(tmp_path / "two", tmp_path / "one", rejected=0)
