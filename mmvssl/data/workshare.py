"""Work shared by the processes of one offline pass (`narrate`, `rephrase`, `shards add-features`,
`shards add-flow`, `extract`, `index build`): the one place that knows about processes there.

`torchrun --nproc_per_node N [--nnodes M ...] -m mmvssl.cli PASS ...` starts N x M copies of
the same command and tells each its place through the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `Share.from_env()` reads them; without them the pass is
one process and every method here is a no-op. Items (input shards, output parts) are split by
`mine`: item i of an ordered list goes to rank i % world, the same on every process, so no
process has to tell another what it took. Processes meet only at `barrier` and
`gather_objects`, through a gloo process group made on first use from the same environment
(gloo runs on every machine, GPU or not, and the passes exchange only a few small records).

accelerate is for training (models, optimisers, gradient sync); an offline pass needs only a
rank, a split and a meeting point, and torch.distributed gives those directly.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

from ..errors import MmvsslError

T = TypeVar("T")
# How long a process waits at a meeting point for the others: a pass ends with every process
# waiting for the slowest, which on a large narrate run is hours; MMVSSL_WORKSHARE_TIMEOUT_S overrides.
DEFAULT_TIMEOUT_S = 7 * 24 * 3600
_made_group = False  # whether this module made the process group (and so may destroy it)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise MmvsslError(f"{name}={value!r} is not an integer (set by torchrun; unset it to run one process)") from None


@dataclass
class Share:
    """This process's place in an offline pass: `rank` of `world` processes (`local_rank` on its node)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_env(cls) -> "Share":
        """From torchrun's variables; one process when WORLD_SIZE is unset (or 1). A WORLD_SIZE above
        1 without RANK, MASTER_ADDR or MASTER_PORT, or a RANK outside [0, WORLD_SIZE), stops with one line."""
        world, rank, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
        timeout = float(os.environ.get("MMVSSL_WORKSHARE_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
        if world is None or world == 1:
            if rank not in (None, 0):
                raise MmvsslError(f"RANK={rank} but WORLD_SIZE is {world or 'unset'}: start the processes with "
                                  f"torchrun, or unset RANK to run one process")
            return cls(0, 1, 0, timeout)
        if world < 1:
            raise MmvsslError(f"WORLD_SIZE={world} must be at least 1")
        missing = [n for n, v in (("RANK", rank), ("MASTER_ADDR", os.environ.get("MASTER_ADDR")),
                                  ("MASTER_PORT", os.environ.get("MASTER_PORT"))) if v in (None, "")]
        if missing:
            raise MmvsslError(f"WORLD_SIZE={world} says several processes, but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not set: start the pass with torchrun, "
                              f"or unset WORLD_SIZE to run one process")
        if not 0 <= rank < world:
            raise MmvsslError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
        return cls(rank, world, local if local is not None else 0, timeout)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This process's items of an ordered list: item i goes to rank i % world."""
        return list(items[self.rank::self.world])

    def owns(self, index: int) -> bool:
        """Whether item `index` of an ordered stream is this process's (index % world == rank)."""
        return index % self.world == self.rank

    def _group(self):
        global _made_group
        import torch.distributed as dist
        if not dist.is_initialized():  # made here on first use (torchrun's env:// rendezvous)
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world,
                                    timeout=datetime.timedelta(seconds=self.timeout_s))
            if not _made_group:
                atexit.register(_destroy)  # a pass that ends by an error leaves it too
            _made_group = True
        elif dist.get_world_size() != self.world:
            raise MmvsslError(f"a process group of {dist.get_world_size()} processes exists, but WORLD_SIZE is "
                              f"{self.world}")
        return dist

    def barrier(self) -> None:
        """Wait until every process gets here (a no-op for one process)."""
        if self.world > 1:
            self._group().barrier()

    def gather_objects(self, obj: Any) -> list:
        """Every process's `obj`, in rank order, on every process. `obj` must be JSON-able: it travels
        as JSON text (torch's all_gather_object pickles, but only these strings of our own), and
        comes back as JSON gives it (tuples as lists, dict keys as strings)."""
        text = json.dumps(obj)
        if self.world == 1:
            return [json.loads(text)]
        out: list = [None] * self.world
        self._group().all_gather_object(out, text)
        return [json.loads(t) for t in out]

    def close(self) -> None:
        """Leave the process group made here (one made by someone else, e.g. accelerate, is left alone)."""
        _destroy()

    def __enter__(self) -> "Share":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def _destroy() -> None:
    global _made_group
    if _made_group:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        _made_group = False
