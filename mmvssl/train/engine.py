"""The training loop: setup -> one explicit loop over accelerate -> final model. No Trainer class.

The loop knows no method: `method.name` picks a method unit (mmvssl/methods/), which builds the
model it trains and turns embeddings into a loss; per step the engine calls prepare -> embed ->
loss -> backward -> optimizer step -> after_step, and checkpoints the method's state beside the
model's. `data.batch_size` is per process; the global batch is batch_size x processes, and
`train.accum_steps` splits each process's batch into micro-batches without losing negatives
(see step.py).

Faults: a step whose loss or gradient is not finite is skipped and counted; `train.max_bad_steps`
in a row stop the run, naming the step and the term. SIGTERM / SIGINT finish the current step,
save a checkpoint and return; `train.resume=latest` continues at the same step with the same
data (the loader skips the consumed batches), the same RNG state and the same method state
(teachers, centres, temperatures).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from omegaconf import DictConfig

from ..config import save_config, to_dict
from ..data.elastic import EpochRecord
from ..data.loader import SampleSpec, build_loader
from ..data.text import tokenizer_for
from ..data.options import loader_options
from ..data.options import sample_spec as data_sample_spec
from ..errors import ConfigError, MmvsslError
from ..methods import BuildContext, build_method
from ..modalities import MODALITIES
from . import fsdp
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .monitor import RunLog, available_trackers, environment, flat_scalars, keep_metrics_until
from .optim import build_optimizer, warmup_cosine
from .step import forward_backward, grad_norm


def sample_spec(cfg: DictConfig, train: bool) -> SampleSpec:
    d = cfg.data
    return data_sample_spec(d, train, d.seed if d.seed is not None else cfg.train.seed)


def _to_device(batch: dict, device: torch.device, modalities: set[str]) -> dict:
    out = {}
    for k, v in batch.items():
        if k in MODALITIES and k not in modalities:
            continue  # the objective does not use this modality: do not encode it
        out[k] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    return out


class StopSignal:
    """SIGTERM / SIGINT ask the loop to stop after the current step (a second SIGINT kills)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _global_mean(accelerator: Accelerator, loss: torch.Tensor, terms: dict) -> tuple[torch.Tensor, dict]:
    """The loss and terms averaged over processes (one all-reduce); as they are in one process."""
    if accelerator.num_processes == 1:
        return loss, terms
    values = accelerator.reduce(torch.stack([loss.float(), *(v.float() for v in terms.values())]), "mean")
    return values[0], dict(zip(terms, values[1:]))


def _agree_on_batch(batch: dict | None, device: torch.device) -> tuple[dict | None, int]:
    """data.mode=epoch on several processes: every process takes this step with a batch of the same
    size, or none does (the end of the epoch for all). The epoch's split gives every process equal
    batches (mmvssl/data/elastic.py); what it cannot foresee (a sample that fails to decode, a shard
    cut short) is settled here by the smallest batch, one all-reduce a step, so no process waits for
    a step the others never take (the webdataset + DDP hang) and the gathered negatives line up.
    Returns the batch (cut to the agreed size, None at the epoch's end) and the samples left out
    over all processes."""
    size = 0 if batch is None else len(batch["key"])
    sizes = torch.tensor([size, -size], dtype=torch.long, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MIN)
    low, high = int(sizes[0]), -int(sizes[1])
    if low == high:
        return batch, 0
    cut = torch.tensor([size - low], dtype=torch.long, device=device)
    dist.all_reduce(cut)  # the samples every process leaves out, summed: the same count in each
    if low == 0:
        return None, int(cut)
    return _first_samples(batch, size, low), int(cut)


def _first_samples(batch: dict, size: int, n: int) -> dict:
    """The first n samples of a batch of `size`: per-sample tensors and the key / meta lists
    (the read positions stay whole: the samples cut are consumed, and counted as left out)."""
    return {k: v[:n] if (isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == size)
            or (k in ("key", "meta")) else v for k, v in batch.items()}


def _rng_states() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"].numel():
        torch.cuda.set_rng_state(states["cuda"])


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    return bool(getattr(torch, "accelerator", None) and torch.accelerator.is_available())


def make_accelerator(t: DictConfig, trackers: list[str], out: Path) -> Accelerator:
    """The Accelerator for `train:`, with one process group over every process the launcher
    started, or a one-line error; never processes that each train a copy alone.

    Without a GPU (or another accelerator device) accelerate runs on the CPU only when told to:
    otherwise, under torchrun on a CPU machine with a CUDA build of torch, it creates a process
    group of backend "undefined", reports DistributedType.NO and one process, and every process
    trains alone. So cpu=True whenever no device is present: DistributedType.MULTI_CPU on gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1:
        missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise MmvsslError(f"WORLD_SIZE={world_size} says several processes, but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not set: start them with torchrun or "
                              f"accelerate launch, or unset WORLD_SIZE to train in one process")
    accelerator = Accelerator(cpu=t.cpu or not _has_accelerator_device(), mixed_precision=t.mixed_precision,
                              log_with=trackers or None, project_dir=str(out),
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=t.find_unused_parameters)])
    if fsdp.requested() and accelerator.distributed_type.value == "MULTI_CPU":
        fsdp.check_settings(t)  # accelerate would wrap the model in DDP: mmvssl shards it itself (fsdp.py)
    elif fsdp.requested() and accelerator.distributed_type.value != "FSDP":
        # accelerate turns a FSDP launch into FSDP only on a GPU-like device (docs/distributed.md,
        # "FSDP and DeepSpeed on CPU"); on CPUs mmvssl's own FSDP needs a process group (MULTI_CPU)
        import accelerate
        raise MmvsslError(f"the launcher asked for FSDP, but accelerate {accelerate.__version__} set up "
                          f"{accelerator.distributed_type.value} on {accelerator.device.type} with "
                          f"{accelerator.num_processes} process(es): FSDP on CPUs needs several processes "
                          f"(configs/accelerate/fsdp_cpu.yaml); one process trains without it")
    if world_size > 1 and (accelerator.num_processes != world_size or not dist.is_initialized()):
        raise MmvsslError(f"the launcher started {world_size} processes (WORLD_SIZE) but accelerate set up "
                          f"{accelerator.num_processes} (distributed type {accelerator.distributed_type.value}, "
                          f"process group {'present' if dist.is_initialized() else 'absent'}): they would "
                          f"each train alone; check the launcher's configuration (accelerate config, "
                          f"ACCELERATE_* variables)")
    return accelerator


def pretrain(cfg: DictConfig) -> Path:
    """Train the model the config describes; returns the folder of the final model (or, when a
    signal stopped the run, of the checkpoint it saved)."""
    t = cfg.train
    if t.accum_steps < 1 or cfg.data.batch_size % t.accum_steps:
        raise ConfigError(f"train.accum_steps={t.accum_steps} must be >= 1 and divide data.batch_size="
                          f"{cfg.data.batch_size}")
    trackers, tracker_note = available_trackers(t.log_with)
    out = Path(t.output_dir)
    accelerator = make_accelerator(t, trackers, out)
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    if t.accum_steps > 1 and accelerator.distributed_type.value == "DEEPSPEED":
        raise ConfigError("train.accum_steps > 1 is not supported under DeepSpeed (its engine steps on every "
                          "backward); use DDP or FSDP, or a smaller model per process")
    set_seed(t.seed, device_specific=False)
    ckpt_dir = out / "checkpoints"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "environment.json").write_text(json.dumps(environment(), indent=2))

    # one seed for every process: the loader derives each process's (and worker's) shard and window
    # draws from (seed, rank, slot) itself, and data.mode=epoch needs the same shard order in every
    # process to split one epoch between them (a per-process seed made them read overlapping parts)
    spec = sample_spec(cfg, train=True)
    net, method = build_method(cfg, BuildContext(accelerator=accelerator, out=out, spec=spec))
    for module in net.modules():
        if hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = t.grad_checkpointing
    method.to(accelerator.device)
    cpu_fsdp = fsdp.requested() and accelerator.distributed_type.value == "MULTI_CPU"  # accelerate cannot: fsdp.py
    if cpu_fsdp:
        accelerator.print(fsdp.shard(net))  # before the optimizer, which then holds the sharded parameters
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(t.betas)}")
    # a method may scale the lr per parameter (fine-tuning's layer-wise decay: methods/supervised.py)
    lr_scale = method.lr_scale([n for n, _ in net.named_parameters()]) if hasattr(method, "lr_scale") else None
    optimizer = build_optimizer(net, t.lr, t.weight_decay, method=method, betas=tuple(t.betas), eps=t.eps,
                                lr_scale=lr_scale)
    scheduler = warmup_cosine(optimizer, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    if cpu_fsdp:  # the model is sharded already; accelerate's prepare would wrap it in DDP
        model, optimizer = net, accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(net, optimizer)
    full_optimizer = fsdp.FullOptimizerState(net, method, optimizer) if cpu_fsdp else None
    ema = None
    if t.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
    modules = {name: m for name, m in (("method", method), ("ema", ema))
               if m is not None and len(m.state_dict())}

    step = batches_consumed = failed_total = bad_total = left_out = 0
    data_state = None
    resume_rng, skipped_before = None, []
    resume_from = resolve_resume(t.resume, ckpt_dir)
    if resume_from is not None:
        # under accelerate's FSDP / ZeRO the optimizer state is sharded per process: not in our checkpoints
        # yet; mmvssl's FSDP on CPUs saves it gathered (fsdp.FullOptimizerState)
        state = load_checkpoint(resume_from, net, full_optimizer or (None if sharded else optimizer), scheduler,
                                modules)
        if sharded:
            accelerator.print("note: FSDP / DeepSpeed resume restores weights, schedule and data position; "
                              "the optimizer moments start afresh")
        step, batches_consumed = int(state["step"]), int(state.get("batches_consumed", state["step"]))
        failed_total, bad_total = int(state.get("failed_samples", 0)), int(state.get("bad_steps", 0))
        skipped_before = list(state.get("skipped_shards", []))  # their URLs, counted into metrics.jsonl
        extra = state["states"]
        if accelerator.scaler is not None and "scaler" in extra:
            accelerator.scaler.load_state_dict(extra["scaler"])
        rng = extra.get("rng", [])
        resume_rng = rng[accelerator.process_index] if len(rng) == accelerator.num_processes else None
        data_state = state.get("data")  # data.mode=epoch: the epoch and what of it was consumed
        if accelerator.is_main_process:
            keep_metrics_until(out / "metrics.jsonl", step)
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if t.compile:
        model = torch.compile(model)
    if trackers:
        accelerator.init_trackers("pretrain", config=flat_scalars(to_dict(cfg)))

    def checkpoint() -> Path:
        rng = gather_object([_rng_states()]) if accelerator.num_processes > 1 else [_rng_states()]
        data = None
        if epoch_mode:  # what every process consumed of this epoch, as one process-count-independent record
            merged = EpochRecord(record.epoch)
            for state in (gather_object([record.state()]) if accelerator.num_processes > 1 else [record.state()]):
                merged.merge(EpochRecord.from_state(state))
            data = merged.state()
        data_fields = {"left_out_samples": left_out, **({"data": data} if data is not None else {})}
        skipped = log.skipped_shard_urls()  # collective, as the gather above
        weights = accelerator.get_state_dict(model) if sharded else net  # gathering is collective under FSDP
        if cpu_fsdp:  # gathered (collective) onto rank 0
            weights, optimizer_state = fsdp.full_model_state(net), full_optimizer.state_dict()
        path = None
        if accelerator.is_main_process:
            states = {"rng": rng}
            if accelerator.scaler is not None:
                states["scaler"] = accelerator.scaler.state_dict()
            path = save_checkpoint(ckpt_dir, step, weights, optimizer_state if cpu_fsdp else optimizer, scheduler,
                                   {**data_fields, "failed_samples": failed_total, "batches_consumed": batches_consumed,
                                    "bad_steps": bad_total, "skipped_shards": skipped},
                                   keep_last=t.keep_last, modules=modules, states=states)
        accelerator.wait_for_everyone()
        return path or ckpt_dir / f"step_{step:08d}"

    # each process streams its own resampled shards; a resumed run skips the consumed batches.
    # In epoch mode (data.mode=epoch) each pass over the data is one epoch and the next reseeds; a
    # resumed run reads the rest of its epoch, on any number of processes (mmvssl/data/elastic.py).
    options = loader_options(cfg.data)
    epoch_mode = options["mode"] == "epoch"
    record = EpochRecord.from_state(data_state) if epoch_mode else EpochRecord()  # what this epoch consumed
    epoch, planned_left_out, empty_epochs = record.epoch, 0, 0

    tokenizer = tokenizer_for(net, spec.context_length)  # the model's own (an imported model's), else CLIP's BPE

    def make_loader(start_batch: int):
        nonlocal planned_left_out
        made = build_loader(cfg.data.shards, spec, cfg.data.batch_size, start_batch=0 if epoch_mode else start_batch,
                            epoch=epoch, tokenizer=tokenizer, record=record if epoch_mode else None, **options)
        if epoch_mode:
            split = made.dataset.pipeline[0].split(accelerator.num_processes)
            planned_left_out = split.dropped
            if split.dropped:
                accelerator.print(f"epoch {epoch}: {split.remaining} samples left over {split.processes} processes; "
                                  f"{split.dropped} of them wait for the next epoch so every process takes "
                                  f"{split.steps} steps of equal batches")
        return made
    loader = make_loader(batches_consumed)
    params = list(net.parameters()) + [p for p in method.parameters() if p.requires_grad]
    log = RunLog(accelerator, out, t.max_steps, step, use_trackers=bool(trackers), skipped=skipped_before)

    if tracker_note and accelerator.is_main_process:
        print(tracker_note, file=sys.stderr)
    model.train()
    bad_in_a_row = 0
    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    data_iter = iter(loader)
    if resume_rng is not None:  # after iter(loader), which draws a worker seed from the RNG
        _set_rng_states(resume_rng)
    try:
        with StopSignal() as stop:
            stopping = False  # agreed by every process (a signal may reach them at different steps)
            taken = False  # a batch taken in this epoch
            while step < t.max_steps and not stopping:
                tic = time.perf_counter()
                try:
                    batch = next(data_iter)
                except StopIteration:  # the end of an epoch (epoch mode or data.epoch_length)
                    batch = None
                except Exception:
                    if stop.received:  # Ctrl-C reached the loader's workers too: stop without this batch
                        break
                    raise
                if epoch_mode and accelerator.num_processes > 1:
                    batch, cut = _agree_on_batch(batch, accelerator.device)
                    left_out += cut
                if batch is None:  # the end of an epoch, for every process at once
                    empty_epochs = 0 if taken else empty_epochs + 1
                    if empty_epochs >= 2:
                        raise MmvsslError(f"data.shards: two epochs in a row gave no batch ({cfg.data.shards}, "
                                          f"data.batch_size={cfg.data.batch_size}, {accelerator.num_processes} "
                                          f"process(es)); check that the shards hold readable samples")
                    left_out += planned_left_out if epoch_mode else 0
                    epoch, taken = epoch + 1, False
                    record = EpochRecord(epoch)
                    data_iter = iter(make_loader(0))
                    continue
                taken = True
                if epoch_mode:
                    record.add(batch["read"])
                batches_consumed += 1
                data_wait += time.perf_counter() - tic
                failed_total += int(batch["failed"])
                batch = method.prepare(_to_device(batch, accelerator.device, method.modalities))
                loss, terms = forward_backward(model, method, batch, accelerator, t.accum_steps)
                norm = (fsdp.clip_grad_norm(params, t.grad_clip) if cpu_fsdp
                        else grad_norm(accelerator, params, t.grad_clip))
                # one flag for all processes, so that they all skip (or stop) together
                flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(norm), torch.tensor(bool(stop.received))
                                     .to(loss.device)]).float()
                if accelerator.num_processes > 1:
                    flags = accelerator.reduce(flags, "sum")
                bad_loss, bad_grad, stop_flag = (bool(f) for f in flags.tolist())
                stopping = stop_flag
                if stop_flag and not stop.received:
                    stop.received = "SIGTERM"  # another process was signalled
                if bad_loss or bad_grad:
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.scaler is not None:
                        accelerator.scaler.update()  # fp16: lower the loss scale, as a skipped scaler step does
                        if not bad_loss:
                            continue  # an fp16 overflow: the scaler's business, not a fault
                    bad_total += 1
                    bad_in_a_row += 1
                    bad_terms = [k for k, v in terms.items() if not torch.isfinite(v)]
                    what = (f"loss term(s) {', '.join(bad_terms)}" if bad_terms
                            else "the loss" if bad_loss else "the gradient (every loss term was finite)")
                    accelerator.print(f"step {step + 1}: {what} not finite "
                                      f"({', '.join(f'{k}={v.item():.3g}' for k, v in terms.items())}); step skipped")
                    if bad_in_a_row >= t.max_bad_steps:
                        raise MmvsslError(f"{what} not finite for {bad_in_a_row} steps in a row "
                                          f"(train.max_bad_steps={t.max_bad_steps}), last at step {step + 1}; "
                                          f"lower train.lr, check the data, or resume from an earlier checkpoint")
                    continue
                bad_in_a_row = 0
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(net)
                step += 1
                method.after_step(net, step)
                window_samples += cfg.data.batch_size * accelerator.num_processes
                log.advance()
                if step % t.log_every == 0 or step == t.max_steps:
                    elapsed = time.perf_counter() - window_start
                    # each process's loss is its share of the global one (contrastive.py): log the
                    # mean over processes, the loss of the global batch (every process gets here)
                    loss, terms = _global_mean(accelerator, loss, terms)
                    log.write({"step": step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()},
                               "lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples / max(elapsed, 1e-9),
                               "data_wait": data_wait / max(elapsed, 1e-9), "failed_samples": failed_total,
                               "bad_steps": bad_total, **method.log_values()})
                    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
                if t.save_every > 0 and step % t.save_every == 0 and step < t.max_steps:
                    checkpoint()

    except BaseException:
        log.close()  # the progress bar and metrics.jsonl, before the error is printed
        raise

    if stop.received and step < t.max_steps:  # (every process: `stopping` was agreed, or a loader was interrupted)
        path = checkpoint()
        log.close()
        accelerator.print(f"{stop.received}: saved {path} at step {step}; continue with train.resume=latest")
        return path
    path = checkpoint()
    final = out / "model"
    if cpu_fsdp:
        fsdp.save_pretrained(net, final, accelerator.is_main_process)  # the weights gathered (collective)
    if accelerator.is_main_process:
        if not cpu_fsdp:
            net.save_pretrained(final)
        if ema is not None:
            ema.module.save_pretrained(out / "model_ema")
        accelerator.print(f"saved the model to {final}")
    accelerator.wait_for_everyone()  # before log.close(): accelerate's end_training destroys the process group
    log.close()
    return final
