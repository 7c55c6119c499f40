"""Offline passes on many processes (issue 26): `torchrun --nproc_per_node 2 -m mmvssl.cli PASS ...`
splits the input shards over the processes and writes what one process writes (shards byte for
byte, the same report, the same JSON lines after sorting); a killed process's shards are redone
by the next run, no others. mmvssl/data/workshare.py is the one place that knows the processes."""

from __future__ import annotations

import pytest

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
