"""Training checkpoints: a folder per step, written to a temporary name and renamed into place,
so a crash mid-save leaves the previous checkpoint intact. Weights are safetensors; optimizer
and scheduler states load with `weights_only=True`, so loading never runs pickled code."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import MmvsslError

PREFIX = "step_"


def save_checkpoint(folder: str | os.PathLike, step: int, model: torch.nn.Module, optimizer, scheduler,
                    extra: dict | None = None, keep_last: int = 2) -> Path:
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=root))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
        with open(tmp / "trainer_state.json") as f:  # make the content durable before the rename
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
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


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer, scheduler) -> dict:
    path = Path(path)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    states = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    return json.loads((path / "trainer_state.json").read_text())
