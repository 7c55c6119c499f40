"""Training checkpoints: a folder per step, written to a temporary name, fsynced and renamed into
place (mmvssl.fsio), so a crash (even kill -9 or a power cut) mid-save leaves the previous
checkpoint intact. Weights are
safetensors; optimizer, scheduler, loss-scaler and RNG states load with `weights_only=True`,
so loading never runs pickled code.

Layout of `step_XXXXXXXX/`: model.safetensors, <name>.safetensors for each extra module (the
objective's temperatures, the EMA weights), optimizer.pt (optimizer, scheduler, extra states),
trainer_state.json (step, batches_consumed, counters) -- written last: a folder without it is
incomplete and ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import MmvsslError
from ..fsio import replace_folder
from .fsdp import is_sharded, load_full_model_state

PREFIX = "step_"
TMP_PREFIX = ".tmp_"


def _tensors(module: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    """The state dict on CPU, each storage once: tied weights (GPT-2's output layer is its token
    embedding) keep their first name only, as safetensors refuses aliases."""
    state = module if isinstance(module, dict) else module.state_dict()
    seen, out = set(), {}
    for k, v in state.items():
        ptr = (v.data_ptr(), v.shape) if v.numel() else None
        if ptr is not None and ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().contiguous().cpu()
    return out


def _load_weights(model: torch.nn.Module, file: Path) -> None:
    """Load a file written by _tensors: names left out as aliases must be tied in `model` too."""
    state = load_file(str(file))
    if is_sharded(model):  # FSDP on CPUs (fsdp.py): the full weights spread into each process's shards
        missing, unexpected = load_full_model_state(model, state)
        tied = set()
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(model.state_dict()) - set(_tensors(model))
    if unexpected or set(missing) - tied:
        raise MmvsslError(f"{file}: does not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {unexpected[:3]})")


def save_checkpoint(folder: str | os.PathLike, step: int, model: torch.nn.Module | dict, optimizer, scheduler,
                    extra: dict | None = None, keep_last: int = 2, modules: dict[str, torch.nn.Module] | None = None,
                    states: dict | None = None) -> Path:
    """Write `folder/step_XXXXXXXX` atomically; `model` is a module or its (gathered) state dict, `optimizer`
    one or its (gathered) state dict; `modules` go to <name>.safetensors, `states` (plain
    tensors, numbers, lists, dicts) into optimizer.pt. Keeps the last `keep_last` checkpoints."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        save_file(_tensors(model), str(tmp / "model.safetensors"))
        for name, module in (modules or {}).items():
            save_file(_tensors(module), str(tmp / f"{name}.safetensors"))
        optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **(states or {})},
                   tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
        replace_folder(tmp, final)  # content fsynced, renamed (swapped with an older save of this step), folder fsynced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "trainer_state.json").is_file())


def resolve_resume(spec: str, checkpoints_dir: str | os.PathLike) -> Path | None:
    """'' -> None; 'latest' -> newest complete checkpoint (None if there is none); else a path."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise MmvsslError(f"train.resume: {path} is not a checkpoint folder (no trainer_state.json)")
    return path


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer, scheduler,
                    modules: dict[str, torch.nn.Module] | None = None) -> dict:
    """Restore into the given objects (optimizer None: leave it); returns trainer_state.json plus
    `states` (the extra states)."""
    path = Path(path)
    _load_weights(model, path / "model.safetensors")
    for name, module in (modules or {}).items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise MmvsslError(f"{path}: has no {file.name}, but this run needs it (was the checkpoint written "
                              f"with another objective or without train.ema_decay?)")
        module.load_state_dict(load_file(str(file)))
    states = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer_state = states.pop("optimizer")
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(states.pop("scheduler"))
    return {**json.loads((path / "trainer_state.json").read_text()), "states": states}
