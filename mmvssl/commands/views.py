"""`mmvssl views CONFIG [key=value ...] --data SHARDS --out DIR [--batches N] [--step S]`: where the
views of a config's training stream lie.

It runs the config's own data pipeline (loader, sampler, augmentation) and, for a method that makes
views or their labels on the device (`views_on_device = True` on its class: CSTP's playback rate and
rotation, ConST-CL's boxes, ConCur's distance labels), the method's `prepare`, then writes

- DIR/views.json: `{"config", "method", "step", "samples": [{"key", "duration", "views": [{"group",
  "index", "start", "end", "frames", "fps", "crop": [x0, y0, x1, y1] (shares of the decoded frame),
  "flip", ...motion-input spacing, ...method-specific flags}]}]}`; the flags are the per-sample entries
  `prepare` adds to the batch under the method's name (`cstp_rate`, `constcl_boxes`, `mcl_run_motion`,
  ...), per view where they have one value per view. Where the batch carries a motion input's source,
  each view also says how far apart its frames are: `next_frame_change` (with `video_next`, the frames
  the temporal gradient is taken against) and `sampled_frame_change`, per frame the mean over pixels
  of the summed |change| of the 3 channels in 0-255 levels to the frame after it (the next decoded
  frame, resp. the next sampled one); `flow_mean` (with `flow`), per frame the mean (dx, dy) of the
  flow in pixels of the clip;
- DIR/views.png: per sample, every view as a bar on one timeline (seconds of the video) with a dot
  per frame, coloured by group.

`--step S` reads the stream as a run resumed at optimizer step S does (what a curriculum that follows
the step, ConCur's, draws then). A config with an online image teacher is not built (that would load
the teacher): its views are the loader's alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MmvsslError

GROUP_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def collect_views(cfg, batches: int = 1, step: int = 0) -> dict:
    """views.json's content for `batches` batches of the config's training stream at `step`."""
    import torch
    from accelerate import Accelerator

    from ..config import to_dict
    from ..data.loader import build_loader
    from ..data.options import loader_options
    from ..methods import BuildContext, build_method, get_method
    from ..train.engine import sample_spec

    spec = sample_spec(cfg, train=True)
    if not spec.multi_view:
        raise MmvsslError(f"data.sampler '{spec.sampler}' gives one view per sample: nothing to show "
                          f"(multi-view samplers: same / uniform with data.num_clips > 1, cvrl, overlap, "
                          f"concur, carl, teg, svt)")
    method = None
    method_cls = get_method(cfg.method.name)
    online_teacher = bool(cfg.teacher.arch) and not cfg.teacher.cached
    if not online_teacher:  # the method may set the loader's view options (ConCur's curriculum)
        _, method = build_method(cfg, BuildContext(accelerator=Accelerator(cpu=True), out=None, spec=spec))
        if hasattr(method, "step") and isinstance(method.step, torch.Tensor):
            method.step.fill_(step)  # a schedule of the step, as a resumed run has it
    on_device = method is not None and getattr(method_cls, "views_on_device", False)
    options = {**loader_options(cfg.data), "epoch_length": None, "mode": "resampled"}
    loader = build_loader(cfg.data.shards, spec, cfg.data.batch_size, start_batch=step, **options)  # a batch a step
    samples = []
    for b, batch in enumerate(loader):
        if b >= batches:
            break
        if on_device:
            method.train()
            with torch.no_grad():
                batch = method.prepare(batch)
        samples += _describe_batch(batch, cfg.method.name)
    return {"config": to_dict(cfg), "method": cfg.method.name, "step": step, "device_views": on_device,
            "samples": samples}


def _describe_batch(batch: dict, method: str) -> list[dict]:
    """Per sample, every view's window, frames, crop and flip, and the method's flags."""
    import torch

    from ..modalities import is_group
    groups = [("video", batch["video"])] + [(k, v) for k, v in batch.items() if is_group(k)]
    layout = [(name, i, int(x.shape[3])) for name, x in groups for i in range(x.shape[1])]  # (group, index, T)
    times, crops = batch["view_times"], batch.get("view_crops")
    flags = {k: v for k, v in batch.items() if k.startswith(f"{method}_") and isinstance(v, torch.Tensor)}
    flags.update(_motion_spacing(batch))  # per view, where the batch has a motion input's source
    out = []
    for s, (key, meta) in enumerate(zip(batch["key"], batch["meta"])):
        flips = meta.get("view_flips") or [False] * len(layout)
        views = []
        for v, (group, index, frames) in enumerate(layout):
            start, end = (float(x) for x in times[s, v])
            view = {"group": group, "index": index, "start": start, "end": end, "frames": frames,
                    "fps": frames / (end - start) if end > start else 0.0,
                    "crop": [float(x) for x in crops[s, v]] if crops is not None else [0.0, 0.0, 1.0, 1.0],
                    "flip": bool(flips[v]) if v < len(flips) else False}
            for name, value in flags.items():  # a flag with one value per view of the sample goes to that view
                if value.ndim >= 2 and value.shape[1] == len(layout):
                    view[name] = value[s, v].tolist()
            views.append(view)
        sample = {"key": key, "duration": float(meta.get("duration") or 0.0), "views": views}
        for name, value in flags.items():  # the rest of the sample's flags
            if not (value.ndim >= 2 and value.shape[1] == len(layout)):
                sample[name] = value[s].tolist()
        out.append(sample)
    return out


def _motion_spacing(batch: dict) -> dict:
    """How far apart the frames of `video`'s views (B, V, C, T, H, W) are, in the batch's own terms:
    `next_frame_change` (B, V, T) against `video_next`, `sampled_frame_change` (B, V, T - 1) against the
    next sampled frame (mean over pixels of the channels' summed |change|, 0-255 levels), `flow_mean`
    (B, V, T, 2) the flow's mean (dx, dy) in pixels of the clip."""
    from ..data.loader import VIDEO_MEAN, VIDEO_STD
    video = batch["video"]
    if video.ndim != 6:
        return {}
    out = {}

    def levels(x):  # normalised frames -> 0-255 levels; channels at dim 2 of (B, V, C, T, H, W)
        return (x.float() * VIDEO_STD.view(3, 1, 1, 1) + VIDEO_MEAN.view(3, 1, 1, 1)) * 255.0

    pixels = levels(video)
    out["sampled_frame_change"] = (pixels[:, :, :, 1:] - pixels[:, :, :, :-1]).abs().sum(2).mean(dim=(-2, -1))
    following = batch.get("video_next")
    if following is not None and following.shape == video.shape:
        out["next_frame_change"] = (levels(following) - pixels).abs().sum(2).mean(dim=(-2, -1))
    flow = batch.get("flow")
    if flow is not None and flow.ndim == 6 and flow.shape[:2] == video.shape[:2]:
        out["flow_mean"] = flow.float().mean(dim=(-2, -1)).transpose(2, 3)  # (B, V, T, 2)
    return out


def plot_views(report: dict, path: Path, max_samples: int = 8) -> None:
    """views.png: one panel per sample, one bar per view on the sample's timeline, a dot per frame."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    samples = report["samples"][:max_samples]
    rows = max(1, len(samples))
    height = sum(0.9 + 0.22 * len(s["views"]) for s in samples) or 2.0
    fig, axes = plt.subplots(rows, 1, figsize=(9, height), squeeze=False)
    for ax, sample in zip(axes[:, 0], samples):
        groups = list(dict.fromkeys(v["group"] for v in sample["views"]))
        for y, view in enumerate(sample["views"]):
            colour = GROUP_COLOURS[groups.index(view["group"]) % len(GROUP_COLOURS)]
            ax.barh(y, view["end"] - view["start"], left=view["start"], height=0.6, color=colour, alpha=0.35)
            frames = view["start"] + np.arange(view["frames"]) * (view["end"] - view["start"]) / view["frames"]
            ax.plot(frames, np.full_like(frames, y), "|", color=colour, markersize=8)
        ax.set_yticks(range(len(sample["views"])))
        ax.set_yticklabels([f"{v['group']}[{v['index']}] {v['fps']:.1f} fps{' flip' if v['flip'] else ''}"
                            for v in sample["views"]], fontsize=7)
        ax.invert_yaxis()
        if sample["duration"]:
            ax.axvspan(0, sample["duration"], color="0.9", zorder=-1)
        ax.set_title(f"{sample['key']} ({sample['duration']:.1f} s)", fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("seconds of the video")
    fig.suptitle(f"{report['method']}: views at step {report['step']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / height))  # room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _views(args) -> None:
    from ..config import load_config
    cfg = load_config(args.config, [f"data.shards={args.data}", *args.overrides])
    if args.batches < 1 or args.step < 0:
        raise MmvsslError(f"--batches must be >= 1 and --step >= 0 (got {args.batches}, {args.step})")
    report = collect_views(cfg, args.batches, args.step)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "views.json").write_text(json.dumps(report, indent=1))
    plot_views(report, out / "views.png")
    print(f"{len(report['samples'])} samples' views -> {out / 'views.json'}, {out / 'views.png'}")


def register(sub) -> None:
    v = sub.add_parser("views", help="where a config's training views lie in time and space (views.json, views.png)")
    v.add_argument("config")
    v.add_argument("--data", required=True, help="training shards (data.shards)")
    v.add_argument("--out", required=True, help="folder for views.json and views.png")
    v.add_argument("--batches", type=int, default=1, help="batches of the stream to describe")
    v.add_argument("--step", type=int, default=0, help="read the stream as a run resumed at this optimizer step")
    v.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=4")
    v.set_defaults(func=_views)
