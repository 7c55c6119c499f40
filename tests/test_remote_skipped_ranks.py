"""Skipped shards counted over processes: a 2-process `torchrun` pretrain in data.mode=epoch over
local shards, two of them damaged (empty, truncated); each process skips what its share opens, and the main process's
metrics.jsonl counts the distinct shards skipped by either (RunLog gathers them at every record)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.test_distributed_cli import CONFIG, PRESET, ROOT, _free_port


def test_two_processes_count_the_shards_either_skipped(tmp_path):
    from mmvssl.data.shards import build_shards
    from mmvssl.data.synth import make_synthetic_dataset
    make_synthetic_dataset(tmp_path / "data", seed=0, num_train=16, num_val=1, size=48, seconds=2.0)
    shards = tmp_path / "shards"
    build_shards(tmp_path / "data" / "train", shards, captions=tmp_path / "data" / "train" / "captions.jsonl",
                 samples_per_shard=4)
    assert len(list(shards.glob("*.tar"))) == 4
    (shards / "shard-000000.tar").write_bytes(b"")  # empty (a missing local shard stops the run at the start)
    data = (shards / "shard-000003.tar").read_bytes()
    (shards / "shard-000003.tar").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "preset.yaml").write_text(PRESET)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(shards=f"'{shards}/shard-{{000000..000003}}.tar'", preset=tmp_path / "preset.yaml",
                                    steps=6))  # beyond the first epoch (about 10 readable samples)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "--tee", "3", "-m", "mmvssl.cli", "pretrain", str(config), "data.batch_size=2", f"train.output_dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    reported = {}  # shard -> the ranks that reported skipping it
    for rank, name in re.findall(r"\[(?:default)?(\d)\]:mmvssl: warning: skipped unreadable shard \S+/(shard-\d+\.tar)",
                                 result.stdout + result.stderr):
        reported.setdefault(name, set()).add(rank)
    assert set(reported) == {"shard-000000.tar", "shard-000003.tar"}
    # the epoch's split gives each damaged shard to one process: rank 1's is known to the main
    # process only through the gather (were both read by both, this test could not tell)
    assert any(ranks == {"1"} for ranks in reported.values()), reported
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_shards"] == 2
