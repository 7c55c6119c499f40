"""One optimisation step's forward and backward: plain, or feature-cached accumulation.

Contrastive losses need every negative at once, so ordinary gradient accumulation (a loss per
micro-batch) changes the objective. With `accum_steps > 1` we use the feature cache of
GradCache (Gao et al. 2021; open_clip's `accum_freq`):

1. embed every micro-batch without gradients (keeping each one's RNG state);
2. compute the loss on the concatenated embeddings, backward to the embeddings (and to the
   objective's temperatures): the cached feature gradients;
3. re-embed each micro-batch with gradients under its saved RNG state and backpropagate the
   cached gradients through it (DDP syncs only on the last one).

Activations of one micro-batch are alive at a time, and the result equals one step on the
whole batch. BatchNorm layers see micro-batch statistics (as in any accumulation); their
running statistics are updated once per micro-batch, not twice.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from ..losses.gather import world
from ..modalities import is_per_sample


def split_batch(batch: dict, parts: int) -> list[dict]:
    """The model inputs of `batch` in `parts` micro-batches along dim 0."""
    size = next(v.shape[0] for k, v in batch.items() if is_per_sample(k) and isinstance(v, torch.Tensor))
    if size % parts:
        raise ValueError(f"batch of {size} does not split into train.accum_steps={parts} equal micro-batches")
    chunks = [{} for _ in range(parts)]
    for k, v in batch.items():
        if is_per_sample(k) and isinstance(v, torch.Tensor):
            for chunk, piece in zip(chunks, v.chunk(parts)):
                chunk[k] = piece
    return chunks


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _sync_objective_grads(objective: torch.nn.Module) -> None:
    """The method (heads, temperatures) lives outside DDP: average its gradients by hand."""
    rank, size = world()
    if size == 1:
        return
    for p in objective.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= size


def _embed(objective, model, batch: dict) -> dict:
    """A method's embeddings (it may run a teacher beside the model); a bare Objective's are the model's."""
    embed = getattr(objective, "embed", None)
    return embed(model, batch) if embed is not None else model(batch)


def forward_backward(model, objective, batch: dict, accelerator, accum_steps: int = 1
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and per-term values (detached) of `batch`; gradients accumulated into the parameters.
    `objective`: a method (mmvssl.methods) or a bare Objective, called on the embeddings and the batch."""
    if accum_steps <= 1:
        with accelerator.autocast():
            embeddings = _embed(objective, model, batch)
        loss, terms = objective(embeddings, batch)
        accelerator.backward(loss)
        _sync_objective_grads(objective)
        return loss.detach(), {k: v.detach() for k, v in terms.items()}

    device = accelerator.device
    chunks = split_batch(batch, accum_steps)
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(device))
            with accelerator.autocast():
                cached.append(_embed(objective, model, chunk))
    after = _rng_state(device)
    embeddings = {k: torch.cat([c[k] for c in cached]).detach().float().requires_grad_()
                  for k in cached[0]}  # (B, ...) each
    loss, terms = objective(embeddings, batch)
    accelerator.backward(loss)  # scaled under fp16: the cached gradients carry the loss scale
    sizes = [c[next(iter(c))].shape[0] for c in cached]
    grads = {k: v.grad.split(sizes) for k, v in embeddings.items() if v.grad is not None}

    buffers = {n: b.clone() for n, b in model.named_buffers()}  # BN statistics after pass 1
    for i, chunk in enumerate(chunks):
        sync = accelerator.no_sync(model) if i < len(chunks) - 1 else nullcontext()
        with sync:
            _set_rng_state(states[i], device)
            with accelerator.autocast():
                out = _embed(objective, model, chunk)
            surrogate = sum((out[k].float() * g[i]).sum() for k, g in grads.items())  # d/d out = g
            surrogate.backward()
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    _set_rng_state(after, device)
    _sync_objective_grads(objective)
    return loss.detach(), {k: v.detach() for k, v in terms.items()}


def grad_norm(accelerator, parameters, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0: no clipping) and return the total norm before clipping (unscaled)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    return accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
