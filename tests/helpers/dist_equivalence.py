"""Launched by tests/test_distributed.py as `torchrun --nproc_per_node 2 ... OUT`: each process
takes its half of the batch of tests/helpers/tiny_model.make_batch, runs the engine's
forward_backward under DDP (plain and with feature-cached accumulation), and rank 0 saves the
mean loss and the (DDP-averaged) gradients to OUT/<mode>.pt."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from mmvssl.train.step import forward_backward
from tests.helpers.tiny_model import build, gradients, make_batch

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
full = make_batch(8)
local = {k: v.chunk(world)[rank] for k, v in full.items()}
for mode, accum in (("plain", 1), ("accum2", 2)):
    net, objective = build()
    model = accelerator.prepare(net)
    loss, terms = forward_backward(model, objective, local, accelerator, accum_steps=accum)
    mean_loss = accelerator.reduce(loss.reshape(1), "mean")
    mean_terms = {k: accelerator.reduce(v.reshape(1), "mean").item() for k, v in terms.items()}
    grads = gradients(net, objective)
    if accelerator.is_main_process:
        torch.save({"loss": mean_loss.item(), "terms": mean_terms, "grads": grads, "world": world}, out / f"{mode}.pt")
accelerator.wait_for_everyone()
accelerator.end_training()
