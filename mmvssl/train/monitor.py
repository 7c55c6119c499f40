"""What a run says about itself: metrics.jsonl, accelerate trackers (TensorBoard), the progress
bar (samples/s, data-wait share, ETA) and the environment saved beside the run. Main process
only; nothing here runs per step except the progress bar's counter."""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ..data.shardio import skipped_shards_log
from ..fsio import atomic_write_text


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions of the packages a run depends on, read from their metadata (importing torchaudio
    just for its version would make a broken torchaudio break every run, audio or not)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return {"python": platform.python_version(), "torch": torch.__version__,
            **{name: installed(name) for name in ("torchaudio", "torchvision", "accelerate", "webdataset")},
            "git_commit": git_commit()}


def available_trackers(log_with: str) -> tuple[list[str], str | None]:
    """The trackers of `train.log_with` that are installed, and a note naming those that are not
    (printed by the engine once setup has succeeded, so that a config error stays one line)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available
    checks = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    wanted = [t.strip() for t in str(log_with or "").split(",") if t.strip() and t.strip().lower() != "none"]
    found = [name for name in wanted if name not in checks or checks[name]()]
    missing = [name for name in wanted if name not in found]
    note = None
    if missing:
        names = " ".join(missing)
        note = (f"mmvssl: train.log_with: {', '.join(missing)} not installed, so that tracker is off "
                f"(pip install {names}, or set train.log_with=none); metrics.jsonl has every value")
    return found, note


def flat_scalars(tree: dict, prefix: str = "") -> dict:
    """A nested config as {dotted.key: scalar} (lists as strings), as trackers' hparams want it."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def keep_metrics_until(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop them from metrics.jsonl. A line
    that is not a JSON object (the last one cut short when the run was killed mid-write) is
    dropped with a one-line note; the file is rewritten atomically."""
    if not path.is_file():
        return
    kept, dropped = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            dropped.append(number)
        elif not isinstance(record.get("step", 0), (int, float)) or record.get("step", 0) <= step:
            kept.append(line)
    if dropped:
        print(f"mmvssl: note: {path}: dropped {len(dropped)} unreadable line(s) ({', '.join(map(str, dropped[:5]))}"
              f"{', ...' if len(dropped) > 5 else ''}; a run killed mid-write leaves its last line cut short)",
              file=sys.stderr)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class RunLog:
    """metrics.jsonl + trackers + progress bar of the main process (a no-op elsewhere).

    Every record also carries `skipped_shards`: how many distinct shards (by URL) any process or
    DataLoader worker reported unreadable (missing, truncated, refused) and skipped since the run
    began, resumes included (`skipped`: the URLs a checkpoint saved). Workers started while the log
    is open record theirs through shardio.skipped_shards_log."""

    def __init__(self, accelerator, out: Path, max_steps: int, start_step: int, use_trackers: bool,
                 skipped: list[str] | tuple = ()):
        self.accelerator, self.use_trackers = accelerator, use_trackers
        self.skipped: set[str] = set(skipped)
        self._skip_log = contextlib.ExitStack()
        self._read_skipped = self._skip_log.enter_context(skipped_shards_log())
        self.main = accelerator.is_main_process
        self.file = open(out / "metrics.jsonl", "a") if self.main else None
        self.progress, self.closed = None, False
        if self.main:
            from tqdm import tqdm
            self.progress = tqdm(total=max_steps, initial=start_step, desc="pretrain", unit="step",
                                 dynamic_ncols=True)

    def skipped_shard_urls(self) -> list[str]:
        """The distinct shards skipped so far by every process and its DataLoader workers. Collective
        with several processes: every process calls it."""
        self.skipped.update(self._read_skipped())
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object
            self.skipped.update(u for urls in gather_object([sorted(self.skipped)]) for u in urls)
        return sorted(self.skipped)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def write(self, record: dict) -> None:
        """Append `record` (and `skipped_shards`); every process calls it at the same step."""
        record = {**record, "skipped_shards": len(self.skipped_shard_urls())}
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.use_trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.1f}",
                                  wait=f"{record['data_wait']:.0%}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._skip_log.close()
        if self.main:
            self.progress.close()
            self.file.close()
        self.accelerator.end_training()
