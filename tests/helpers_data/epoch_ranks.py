"""Run under torchrun: each process reads one epoch with 2 workers and writes its keys.

usage: torchrun --nproc_per_node 2 epoch_ranks.py SHARDS OUT_DIR
"""

import json
import os
import sys

import torch.distributed as dist

from mmvssl.data.loader import SampleSpec, build_loader


def main() -> None:
    shards, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    spec = SampleSpec(num_frames=2, fps=2.0, size=16, audio_rate=8000, context_length=8, train=True, seed=1)
    loader = build_loader(shards, spec, batch_size=3, num_workers=2, mode="epoch")
    keys = [k for batch in loader for k in batch["key"]]
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(keys, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
