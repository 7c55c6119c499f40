"""FSDP on CPUs: mmvssl shards the model itself with torch's FSDP2 (`fully_shard`) when the launcher
asks for FSDP and no GPU is present.

Why this module exists: accelerate (1.15.0, torch 2.11.0) turns a FSDP launch into FSDP only on a
GPU-like device. On the CPU, `Accelerator(cpu=True)` resolves `DistributedType.MULTI_CPU` (gloo) and
wraps the model in DDP, ignoring the FSDP plugin; with `fsdp_sync_module_states: true` its
`FullyShardedDataParallelPlugin` stops earlier with "There are currently no available devices found,
must be one of 'XPU', 'CUDA', ...". torch's own FSDP2 runs on CPU over gloo, so here mmvssl does
what accelerate's FSDP2 path does on GPUs (accelerate/utils/fsdp_utils.py `fsdp2_prepare_model`):
`fully_shard` on every module of the classes `fsdp_transformer_layer_cls_to_wrap` names (`Block`:
the GPU config's TRANSFORMER_BASED_WRAP), children before parents, then on the root (accelerate also
carves a Hugging Face model's input embeddings and output head into units: mmvssl's models have no
`get_input_embeddings`); the optimizer is built on the sharded (DTensor) parameters. What this adds
beside torch:

- `clip_grad_norm`: the norm over DTensor gradients (the model's shards) and plain ones (the
  method's heads and temperatures, outside FSDP) in one number, the same as DDP's;
- `full_model_state` / `FullOptimizerState.state_dict`: the full state gathered onto rank 0's CPU with
  torch.distributed.checkpoint.state_dict, so checkpoints and the final model (`save_pretrained`) are
  the files a DDP run writes; `load_full_model_state` / `FullOptimizerState.load_state_dict` spread
  them back on resume.

Settings accelerate's launcher passes (FSDP_* variables) that this path cannot honour stop the run
at the start with one line (`check_settings`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..errors import ConfigError, MmvsslError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0's CPU only
DEFAULT_UNITS = "Block"  # mmvssl/models/transformer.py, as configs/accelerate/fsdp.yaml wraps on GPUs


def requested() -> bool:
    """The launcher asked for FSDP: `accelerate launch` with a FSDP config sets ACCELERATE_USE_FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def check_settings(train, env: dict[str, str] | None = None) -> None:
    """One line naming the launcher's FSDP settings (and the `train:` keys) this CPU path cannot honour."""
    env = os.environ if env is None else env
    wrong = [f"train.{key} {train[key]} (for DDP and single-process runs)"
             for key, off in (("ema_decay", 0), ("accum_steps", 1), ("compile", False)) if train[key] != off]
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        wrong.append(f"fsdp_auto_wrap_policy {policy} (only TRANSFORMER_BASED_WRAP)")
    if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        wrong.append("fsdp_offload_params true (the parameters are on the CPU already)")
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    if env.get("FSDP_VERSION", "1") == "1" and strategy not in ("FULL_SHARD", "SHARD_GRAD_OP", "1", "2"):
        wrong.append(f"fsdp_sharding_strategy {strategy} (only FULL_SHARD or SHARD_GRAD_OP)")
    if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        wrong.append("fsdp_activation_checkpointing true (use train.grad_checkpointing)")
    if wrong:
        raise ConfigError(f"FSDP on CPUs (mmvssl/train/fsdp.py, torch's fully_shard) cannot honour "
                          f"{'; '.join(wrong)}: change them, or launch with configs/accelerate/cpu.yaml (DDP)")


def _reshard_after_forward(env) -> bool:
    """FSDP2's reshard_after_forward; FSDP1's FULL_SHARD means it, SHARD_GRAD_OP does not."""
    if env.get("FSDP_VERSION", "1") == "2":
        return env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    return env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD") in ("FULL_SHARD", "1")


def shard(net: nn.Module, env: dict[str, str] | None = None) -> str:
    """fully_shard each module of the wrapped classes (its own unit, as TRANSFORMER_BASED_WRAP), then
    the root, in place; returns a line saying what this process holds. Call before building the optimizer."""
    env = os.environ if env is None else env
    names = {n.strip() for n in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", DEFAULT_UNITS).split(",") if n.strip()}
    reshard = _reshard_after_forward(env)
    # children before their parents (reversed pre-order), as accelerate's get_module_children_bottom_up:
    # a unit's parameters leave the group of any unit around it
    units = [m for m in reversed(list(net.modules())) if type(m).__name__ in names and m is not net]
    if not units:
        raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap {sorted(names)}: no module of the model "
                          f"({type(net).__name__}) has that class; mmvssl's transformer layers are 'Block'")
    for module in units:
        fully_shard(module, reshard_after_forward=reshard)
    fully_shard(net)  # the root with torch's default (kept unsharded after forward), as accelerate's FSDP2 does
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in net.parameters())
    total = sum(p.numel() for p in net.parameters())
    return (f"FSDP on CPUs (torch fully_shard): {len(units)} {'/'.join(sorted(names))} units and the root; "
            f"this process holds {held} of the model's {total} parameters")


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0: no clipping) over sharded (DTensor) and plain gradients together; the
    total norm before clipping as a plain tensor, equal on every process. torch's clip_grad_norm_
    takes DTensors but returns a DTensor; the two kinds are summed here explicitly (squares), so the
    plain gradients (replicated, already averaged) count once."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    total = torch.zeros((), dtype=torch.float32)
    if sharded:
        total = total + torch.nn.utils.get_total_norm(sharded).full_tensor().float().cpu() ** 2
    if plain:
        total = total + torch.nn.utils.get_total_norm(plain).float().cpu() ** 2
    total = total.sqrt()
    if max_norm > 0:  # torch's clip_grads_with_norm_ scales with a tensor, which DTensor and plain grads cannot share
        coef = min(max_norm / (float(total) + 1e-6), 1.0)  # torch.nn.utils.clip_grads_with_norm_'s factor
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return total


def full_model_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) state dict on rank 0's CPU, empty on the others; collective."""
    return get_model_state_dict(net, options=FULL)


def load_full_model_state(net: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Spread a full state dict (every process holds it) into the shards; (missing, unexpected)."""
    result = set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return list(result.missing_keys), list(result.unexpected_keys)


class FullOptimizerState:
    """The optimizer's state with full tensors, in the layout of `optimizer.state_dict()` (parameters
    numbered in the order of its groups), so a checkpoint written under FSDP is the one a DDP run
    writes and either resumes the other's AdamW moments. torch's get_optimizer_state_dict gathers it
    (keyed by parameter names over the sharded model and the method's own parameters together);
    here only the names become the numbers. `state_dict` is collective (rank 0 gets the state)."""

    def __init__(self, net: nn.Module, method: nn.Module, optimizer):
        self.both = nn.ModuleDict({"net": net, "method": method})  # names for every parameter the optimizer holds
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer

    def state_dict(self) -> dict:
        by_name = get_optimizer_state_dict(self.both, self.optimizer, options=FULL)
        if not by_name:  # not rank 0
            return {}
        number: dict[str, int] = {}
        groups = [{**g, "params": [number.setdefault(n, len(number)) for n in g["params"]]}
                  for g in by_name["param_groups"]]
        return {"state": {number[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        names = {id(p): n for n, p in self.both.named_parameters()}
        ordered = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        saved = [i for g in state["param_groups"] for i in g["params"]]
        if len(state["param_groups"]) != len(self.optimizer.param_groups) or sorted(saved) != list(range(len(ordered))):
            raise MmvsslError(f"optimizer.pt: {len(saved)} parameters in {len(state['param_groups'])} groups, but "
                              f"this run's optimizer has {len(ordered)} in {len(self.optimizer.param_groups)}")
        by_name = {"state": {ordered[i]: s for i, s in state["state"].items()},
                   "param_groups": [{**g, "params": [ordered[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.both, self.optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def save_pretrained(net: nn.Module, folder, is_main_process: bool) -> None:
    """The model's own save_pretrained with the gathered weights, on rank 0; collective."""
    state = full_model_state(net)
    if is_main_process:
        with full_state_view(net, state):
            net.save_pretrained(folder)


@contextmanager
def full_state_view(net: nn.Module, state: dict[str, torch.Tensor]):
    """Within the block `net.state_dict()` returns the gathered `state`, so the model's own
    save_pretrained (config.json + model.safetensors) writes the full weights on rank 0."""
    net.state_dict = lambda *args, **kwargs: state  # an instance attribute, removed on exit
    try:
        yield net
    finally:
        del net.state_dict
