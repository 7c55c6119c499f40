"""The training loop: setup -> one explicit loop over accelerate -> final model. No Trainer class.

The loop knows no method: the model returns named embeddings, the objective (built from the
config's terms) turns them into a weighted loss. `data.batch_size` is per process.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig

from ..config import save_config, to_dict
from ..data.loader import SampleSpec, build_loader
from ..losses.objective import Objective
from ..models.presets import apply_overrides, load_preset
from ..models.multimodal import MultimodalModel
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .optim import build_optimizer, warmup_cosine


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _environment() -> dict:
    import accelerate
    import torchaudio
    import torchvision
    import webdataset
    return {"python": platform.python_version(), "torch": torch.__version__, "torchaudio": torchaudio.__version__,
            "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
            "webdataset": getattr(webdataset, "__version__", "?"), "git_commit": _git_commit()}


def sample_spec(cfg: DictConfig, train: bool, seed_offset: int = 0) -> SampleSpec:
    d = cfg.data
    seed = d.seed if d.seed is not None else cfg.train.seed
    return SampleSpec(num_frames=d.num_frames, fps=d.fps, size=d.size, audio_rate=d.audio_rate,
                      context_length=d.context_length, num_candidates=d.num_candidates,
                      train=train, seed=seed + seed_offset)


def _to_device(batch: dict, device: torch.device, modalities: set[str]) -> dict:
    out = {}
    for k, v in batch.items():
        if k in ("video", "audio", "text") and k not in modalities:
            continue  # the objective does not use this modality: do not encode it
        out[k] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    return out


def pretrain(cfg: DictConfig) -> Path:
    """Train the model the config describes; returns the folder of the final model."""
    t = cfg.train
    accelerator = Accelerator(cpu=t.cpu, mixed_precision=t.mixed_precision)
    set_seed(t.seed, device_specific=False)
    out = Path(t.output_dir)
    ckpt_dir = out / "checkpoints"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "environment.json").write_text(json.dumps(_environment(), indent=2))

    preset = apply_overrides(load_preset(cfg.model.preset), to_dict(cfg.model.overrides))
    # the clip sampling the model was trained on travels in its config.json, for evaluation
    preset["sampling"] = {"num_frames": cfg.data.num_frames, "fps": cfg.data.fps, "size": cfg.data.size,
                          "audio_rate": cfg.data.audio_rate}
    model = MultimodalModel(preset)
    objective = Objective(to_dict(cfg.objective.terms), temperature=cfg.objective.temperature)
    optimizer = build_optimizer(model, t.lr, t.weight_decay)
    scheduler = warmup_cosine(optimizer, t.warmup_steps, t.max_steps)

    step = batches_consumed = 0
    resume_from = resolve_resume(t.resume, ckpt_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        step, batches_consumed = int(state["step"]), int(state.get("batches_consumed", state["step"]))
        accelerator.print(f"resumed from {resume_from} at step {step}")
    model, optimizer = accelerator.prepare(model, optimizer)

    # each process streams its own resampled shards; a resumed run skips the consumed batches
    loader = build_loader(cfg.data.shards, sample_spec(cfg, train=True, seed_offset=7919 * accelerator.process_index),
                          cfg.data.batch_size, cfg.data.num_workers, cfg.data.shuffle_buffer,
                          cfg.data.max_error_rate, start_batch=batches_consumed)
    modalities = objective.modalities
    metrics_file = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None
    progress = None
    if accelerator.is_main_process:
        from tqdm import tqdm
        progress = tqdm(total=t.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True)

    model.train()
    failed_total = skipped_steps = 0
    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    data_iter = iter(loader)
    while step < t.max_steps:
        tic = time.perf_counter()
        batch = next(data_iter)
        batches_consumed += 1
        data_wait += time.perf_counter() - tic
        failed_total += int(batch["failed"])
        batch = _to_device(batch, accelerator.device, modalities)
        with accelerator.autocast():
            embeddings = model(batch)
            loss, terms = objective(embeddings, batch)
        if not torch.isfinite(loss):
            skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            accelerator.print(f"step {step}: non-finite loss ({', '.join(f'{k}={v.item():.3g}' for k, v in terms.items())}), step skipped")
            if skipped_steps >= 5:
                raise RuntimeError(f"loss was not finite for {skipped_steps} steps, last at step {step}")
            continue
        skipped_steps = 0
        accelerator.backward(loss)
        if t.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_samples += batch["video"].shape[0] * accelerator.num_processes

        if accelerator.is_main_process:
            progress.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                          "lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples / max(elapsed, 1e-9),
                          "data_wait": data_wait / max(elapsed, 1e-9), "failed_samples": failed_total}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                progress.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.1f}")
                window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
        if t.save_every > 0 and step % t.save_every == 0 and step < t.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(ckpt_dir, step, accelerator.unwrap_model(model), optimizer, scheduler,
                                {"failed_samples": failed_total, "batches_consumed": batches_consumed},
                                keep_last=t.keep_last)

    accelerator.wait_for_everyone()
    final = out / "model"
    if accelerator.is_main_process:
        progress.close()
        metrics_file.close()
        unwrapped = accelerator.unwrap_model(model)
        save_checkpoint(ckpt_dir, step, unwrapped, optimizer, scheduler,
                        {"failed_samples": failed_total, "batches_consumed": batches_consumed}, keep_last=t.keep_last)
        unwrapped.save_pretrained(final)
        accelerator.print(f"saved the model to {final}")
    accelerator.end_training()
    return final
