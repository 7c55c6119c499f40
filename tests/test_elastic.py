"""Elastic, exactly-once training data (issue 26): data.mode=epoch training saved on 2 processes
resumes on 1 and the other way, reading the rest of the epoch once over the new processes; uneven
shard counts (3 shards over 2 processes, workers or processes whose share is empty) never leave a
process waiting. The split is checked on raw samples (no decoding, fast), then through real
2-process launches (accelerate launch with configs/accelerate/cpu.yaml) that record each trained
sample's key per process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import webdataset as wds

from mmvssl.data.elastic import ElasticEpoch, EpochRecord, EpochSplit
from mmvssl.data.shardio import parse_sources
from mmvssl.errors import MmvsslError
from tests.test_distributed_cli import BIN, PRESET, ROOT, _free_port, _launch

SHARDS, PER_SHARD = 3, 3  # 9 samples: odd, so 2 processes cannot share every epoch equally

# the launched processes: pretrain, each trained batch's keys appended to KEYS/rank<r>.jsonl
KEY_LOGGER = """
import json, os, sys
from mmvssl.config import load_config
from mmvssl.train import engine
real = engine.forward_backward
def logged(model, method, batch, accelerator, accum_steps):
    with open(os.path.join(sys.argv[1], f"rank{accelerator.process_index}.jsonl"), "a") as f:
        f.write(json.dumps(batch["key"]) + "\\n")
    return real(model, method, batch, accelerator, accum_steps)
engine.forward_backward = logged
engine.pretrain(load_config(sys.argv[2], sys.argv[3:]))
"""

CONFIG = """
data: {{shards: {shards}, batch_size: 2, num_workers: 0, num_frames: 4, fps: 2.0, size: 32,
        context_length: 16, num_candidates: 2, mode: epoch, shuffle_buffer: 4}}
model: {{preset: {preset}}}
objective:
  temperature: 0.1
  terms:
    - {{name: va_nce, loss: nce, inputs: [video_vat, audio_vat], weight: 1.0}}
    - {{name: vt_milnce, loss: mil_nce, inputs: [video_vat, text_vat], weight: 1.0}}
train: {{max_steps: 1, lr: 1.0e-3, warmup_steps: 0, log_every: 1, save_every: 0, log_with: none, seed: 0}}
"""


@pytest.fixture(scope="module")
def odd_shards(demo_shards, tmp_path_factory) -> Path:
    """3 shards of 3 samples, copied member for member from the demo shards."""
    out = tmp_path_factory.mktemp("odd-shards")
    urls = sorted(map(str, Path(demo_shards["train"]).glob("*.tar")))
    samples = iter(wds.WebDataset(urls, shardshuffle=False))
    for i in range(SHARDS):
        with wds.TarWriter(str(out / f"shard-{i:06d}.tar"), encoder=False) as writer:
            for _ in range(PER_SHARD):
                s = next(samples)
                writer.write({"__key__": s["__key__"], **{k: v for k, v in s.items() if not k.startswith("__")}})
    return out


def _keys(shards) -> list[str]:
    return sorted(s["__key__"] for s in wds.WebDataset(sorted(map(str, Path(shards).glob("*.tar"))),
                                                        shardshuffle=False))


def _read(source: ElasticEpoch, processes: int, workers: int, monkeypatch) -> dict[int, list[list[dict]]]:
    """Each process's batches in the order its DataLoader takes them (batch k from worker k % W)."""
    batches = {}
    for rank in range(processes):
        streams = []
        for w in range(workers):
            monkeypatch.setattr(wds.utils, "pytorch_worker_info", lambda r=rank, w=w, **_: (r, processes, w, workers))
            raws = list(source)
            streams.append([raws[i:i + source.batch_size] for i in range(0, len(raws), source.batch_size)])
        batches[rank] = [streams[k % workers][k // workers] for k in range(sum(map(len, streams)))]
    return batches


def _consume(record: EpochRecord, batches: dict[int, list[list[dict]]], steps: int) -> list[str]:
    keys = []
    for rank_batches in batches.values():
        for batch in rank_batches[:steps]:
            record.add([(raw["__url__"], raw["__shard_index__"]) for raw in batch])
            keys += [raw["__key__"] for raw in batch]
    return keys


def test_split_by_steps_hand_computed():
    # 21 left, 2 processes, batches of 4: steps of 8, 8, then 5 -> 2 each, 1 left out
    split = EpochSplit(21, 2, 4)
    assert (split.steps, split.per_process, split.dropped, split.batch_sizes()) == (3, 10, 1, [4, 4, 2])
    assert split.worker_counts(2) == [6, 4] and split.worker_counts(4) == [4, 4, 2, 0]  # worker 3: empty share
    empty = EpochSplit(1, 2, 4)  # fewer samples than processes: no step, nobody waits for one
    assert (empty.steps, empty.per_process, empty.dropped, empty.worker_counts(2)) == (0, 0, 1, [0, 0])
    assert (EpochSplit(24, 3, 8).steps, EpochSplit(24, 3, 8).dropped) == (1, 0)


@pytest.mark.parametrize("before, after", [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 1), (3, 2))])
def test_rest_of_the_epoch_is_read_once_over_another_process_count(demo_shards, monkeypatch, before, after):
    """The demo's 3 shards of 8: one step on `before` (processes, workers), the record, then the
    rest on `after`: nothing twice, nothing lost; every process the same batch sizes."""
    every = set(_keys(demo_shards["train"]))
    sets = parse_sources(str(demo_shards["train"]))
    first = ElasticEpoch(sets, batch_size=4, seed=3, record=EpochRecord(2))
    record = EpochRecord(2)
    consumed = _consume(record, _read(first, *before, monkeypatch), steps=1)
    assert len(consumed) == 4 * before[0] and record.count() == len(consumed)
    # the record is JSON and means the same thing to a run of any size
    resumed = ElasticEpoch(sets, batch_size=4, seed=3, record=EpochRecord.from_state(json.loads(
        json.dumps(record.state()))))
    rest = _read(resumed, *after, monkeypatch)
    sizes = {rank: [len(b) for b in batches] for rank, batches in rest.items()}
    assert len({tuple(s) for s in sizes.values()}) == 1, sizes  # the same steps and sizes everywhere
    later = [raw["__key__"] for batches in rest.values() for b in batches for raw in b]
    left_out = resumed.split(after[0]).dropped
    assert left_out == (24 - len(consumed)) % after[0]
    assert len(consumed + later) == len(set(consumed + later)) == 24 - left_out
    assert set(consumed + later) <= every


def test_uneven_remainder_and_empty_shares(odd_shards, monkeypatch):
    """9 samples in 3 shards over 2 processes of 3 workers, batches of 2: 2 steps each (8 samples),
    1 left out; a worker with nothing to read yields nothing. 1 sample left over 2 processes: no step."""
    sets = parse_sources(str(odd_shards))
    source = ElasticEpoch(sets, batch_size=2, seed=0)
    batches = _read(source, 2, 3, monkeypatch)
    assert {r: [len(b) for b in bs] for r, bs in batches.items()} == {0: [2, 2], 1: [2, 2]}
    assert source.split(2).dropped == 1
    record = EpochRecord()
    _consume(record, batches, steps=2)
    record.add_run(sets[0].urls[0], 0, 3)
    record.add_run(sets[0].urls[1], 0, 3)
    record.add_run(sets[0].urls[2], 0, 3)
    assert record.count() == 9
    nearly = EpochRecord(0, {u: [[0, 3]] for u in sets[0].urls[:2]} | {sets[0].urls[2]: [[0, 2]]})
    last = ElasticEpoch(sets, batch_size=2, seed=0, record=nearly)
    assert _read(last, 2, 1, monkeypatch) == {0: [], 1: []} and last.split(2).dropped == 1


def test_a_record_of_other_shards_is_refused_in_one_line(odd_shards, demo_shards):
    record = EpochRecord(0, {str(Path(demo_shards["train"]) / "shard-000000.tar"): [[0, 4]]})
    with pytest.raises(MmvsslError, match=r"names 1 shard\(s\) that are not in data\.shards") as e:
        ElasticEpoch(parse_sources(str(odd_shards)), batch_size=2, record=record)
    assert "\n" not in str(e.value)
    with pytest.raises(MmvsslError, match="malformed"):
        EpochRecord.from_state({"epoch": 0, "consumed": {"x": [[0]]}})


def test_loader_batches_carry_what_they_consumed(odd_shards):
    """Through the real loader (decoding): the batches' keys and read positions cover exactly the
    rest of the epoch; the clip windows do not depend on who reads a sample (seeded by its place)."""
    from mmvssl.data.loader import SampleSpec, build_loader
    spec = SampleSpec(num_frames=2, fps=2.0, size=16, audio_rate=8000, context_length=8, train=True, seed=1)
    urls = parse_sources(str(odd_shards))[0].urls
    whole = list(build_loader(str(odd_shards), spec, 2, mode="epoch", epoch=1, record=EpochRecord(1)))
    windows = {k: m["window"] for b in whole for k, m in zip(b["key"], b["meta"])}
    record = EpochRecord(1, {urls[1]: [[0, 3]], urls[0]: [[1, 2]]})  # 4 consumed, 5 left
    rest = list(build_loader(str(odd_shards), spec, 2, mode="epoch", epoch=1, record=record))
    assert [len(b["key"]) for b in rest] == [2, 2, 1]
    read = sorted(tuple(r) for b in rest for r in b["read"])
    assert read == sorted([(urls[0], 0), (urls[0], 2)] + [(urls[2], j) for j in range(3)])
    assert len(windows) == 9
    for b in rest:
        for k, m in zip(b["key"], b["meta"]):
            assert m["window"] == windows[k]


def _pretrain_logging_keys(config: Path, overrides: list[str], keys: Path, monkeypatch) -> None:
    from mmvssl.config import load_config
    from mmvssl.train import engine
    real = engine.forward_backward

    def logged(model, method, batch, accelerator, accum_steps):
        with open(keys / "rank0.jsonl", "a") as f:
            f.write(json.dumps(batch["key"]) + "\n")
        return real(model, method, batch, accelerator, accum_steps)
    monkeypatch.setattr(engine, "forward_backward", logged)
    engine.pretrain(load_config(config, overrides))


def _launch_logging_keys(tmp_path: Path, config: Path, overrides: list[str], keys: Path):
    script = tmp_path / "key_logger.py"
    script.write_text(KEY_LOGGER)
    return _launch([str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu.yaml"),
                    "--main_process_port", str(_free_port()), str(script), str(keys), str(config), *overrides],
                   tmp_path)


def _steps(keys: Path, ranks: int) -> list[list[str]]:
    """Per step, the keys every process trained on (each process's batch in rank order)."""
    per_rank = [[json.loads(line) for line in (keys / f"rank{r}.jsonl").read_text().splitlines()]
                for r in range(ranks)]
    assert len({len(p) for p in per_rank}) == 1, "the processes took different numbers of steps"
    for step in zip(*per_rank):
        assert len({len(batch) for batch in step}) == 1, "the processes' batch sizes differ within a step"
    return [[k for batch in step for k in batch] for step in zip(*per_rank)]


@pytest.fixture(scope="module")
def config(odd_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("elastic")
    (root / "preset.yaml").write_text(PRESET)
    path = root / "config.yaml"
    path.write_text(CONFIG.format(shards=odd_shards, preset=root / "preset.yaml"))
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="2-process gloo launches on linux")
def test_two_processes_saved_then_one_finishes_the_epoch(config, odd_shards, tmp_path, monkeypatch):
    out, keys2, keys1 = tmp_path / "run", tmp_path / "keys2", tmp_path / "keys1"
    keys2.mkdir(), keys1.mkdir()
    # 2 processes of 2 workers, one step: 4 of the 9 samples
    _launch_logging_keys(tmp_path, config, [f"train.output_dir={out}", "data.num_workers=2"], keys2)
    first = _steps(keys2, 2)
    state = json.loads((out / "checkpoints" / "step_00000001" / "trainer_state.json").read_text())
    assert state["data"]["epoch"] == 0
    assert EpochRecord.from_state(state["data"]).count() == len(first[0]) == 4
    # 1 process: the other 5 in steps of 2, 2, 1 (max_steps 4), then the epoch is complete
    _pretrain_logging_keys(config, [f"train.output_dir={out}", "train.resume=latest", "train.max_steps=4"],
                           keys1, monkeypatch)
    rest = _steps(keys1, 1)
    assert [len(s) for s in rest] == [2, 2, 1]
    epoch = [k for s in first + rest for k in s]
    assert sorted(epoch) == _keys(odd_shards)  # each sample exactly once
    final = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert EpochRecord.from_state(final["data"]).count() == 9 and final["data"]["epoch"] == 0


@pytest.mark.skipif(sys.platform != "linux", reason="2-process gloo launches on linux")
def test_one_process_saved_then_two_finish_the_epoch_and_go_on(config, odd_shards, tmp_path, monkeypatch):
    """1 process takes 3 samples; 2 processes (3 workers each: some with an empty share) read the
    other 6 as steps of 2 + 2 and 1 + 1, then go on over uneven epochs of 9 (2 steps of 2 + 2, one
    sample left out and said), never waiting for each other, to max_steps."""
    out, keys1, keys2 = tmp_path / "run", tmp_path / "keys1", tmp_path / "keys2"
    keys1.mkdir(), keys2.mkdir()
    _pretrain_logging_keys(config, [f"train.output_dir={out}", "data.batch_size=3"], keys1, monkeypatch)
    first = _steps(keys1, 1)
    result = _launch_logging_keys(tmp_path, config, [f"train.output_dir={out}", "train.resume=latest",
                                                     "train.max_steps=6", "data.num_workers=3"], keys2)
    steps = _steps(keys2, 2)
    assert [len(s) for s in steps] == [4, 2, 4, 4, 4]
    epoch0, epoch1, epoch2 = first + steps[:2], steps[2:4], steps[4:]
    assert sorted(k for s in epoch0 for k in s) == _keys(odd_shards)  # each sample exactly once
    seen1 = [k for s in epoch1 for k in s]
    assert len(seen1) == len(set(seen1)) == 8 and set(seen1) < set(_keys(odd_shards))
    assert "epoch 1: 9 samples left over 2 processes; 1 of them wait for the next epoch" in result.stdout
    assert len(set(epoch2[0])) == 4
    final = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert final["data"]["epoch"] == 2 and final["left_out_samples"] == 1
