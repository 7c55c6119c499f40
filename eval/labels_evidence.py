"""Few labels: val top-1 of supervised training on the labelled part only, of fine-tuning two
self-supervised checkpoints, and of the semi-supervised methods TG and CMPL, each with the same
fraction of the train labels (per class, by a hash of the sample key: mmvssl.data.labels) and the
same budget of steps.

    .venv/bin/python eval/labels_evidence.py --train runs/demo/shards/train --test runs/demo/shards/val \
        --out runs/labels-evidence [--fractions 0.1 0.01] [--steps 120] [--set data.batch_size=16]

Rows (each at every fraction):
- supervised: `configs/finetune/base.yaml` on a fresh video-tiny (`mmvssl finetune video-tiny`),
  the stream drawn from the labelled samples only (data.labelled_share=1);
- finetune-demo: the same recipe from the demo dual encoder (`--demo-model`, `make demo`'s);
- finetune-<rgb>: the same recipe from an RGB self-supervised checkpoint: `--rgb-model` (a model
  folder, or a run folder of `mmvssl pretrain`, whose last checkpoint is used: e.g.
  runs/methods-evidence/simclr from eval/methods_evidence.py);
- tg, cmpl: `configs/methods/{tg,cmpl}.yaml` as shipped (3/4 of the stream labelled).

Every run has the same train.max_steps, warm-up and batch; each is scored once, at its last step,
on --test (no checkpoint is chosen on it) with --clips x --crops views per video. Writes
OUT/labels_evidence.json and .md (docs/evaluation.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mmvssl.config import load_config
from mmvssl.errors import MmvsslError
from mmvssl.resources import data_path


def rgb_model_folder(path: Path, out: Path) -> Path:
    """A model folder: `path` itself, its `model/`, or one rebuilt from the run's config.yaml and the
    weights of its last checkpoint (safetensors)."""
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    from safetensors.torch import load_file

    from mmvssl.methods.contrastive import build_student
    from mmvssl.train.checkpoint import list_checkpoints
    found = list_checkpoints(path / "checkpoints")
    if not (path / "config.yaml").is_file() or not found:
        raise MmvsslError(f"--rgb-model {path}: neither a model folder nor a run folder with checkpoints")
    net = build_student(load_config(path / "config.yaml"))
    missing, unexpected = net.load_state_dict(load_file(str(found[-1] / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise MmvsslError(f"{found[-1]}: does not match {path / 'config.yaml'} (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    folder = out / f"{path.name}-model"
    net.save_pretrained(folder)
    print(f"{path.name}: model rebuilt from {found[-1]}", flush=True)
    return folder


def pseudo_label_shares(metrics: Path) -> dict:
    """TG's and CMPL's `pseudo_label_share` (and CMPL's `pseudo_label_share_aux`: the other direction)
    in the run's log: the mean over the logged steps and at how many of them any pseudo-label passed
    the threshold. Nothing for a run that logs none (supervised, fine-tuning)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    shares = {}
    for key in ("pseudo_label_share", "pseudo_label_share_aux"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            shares[key] = {"mean": sum(values) / len(values), "max": max(values),
                           "steps_above_0": sum(v > 0 for v in values), "logged_steps": len(values)}
    return shares


def run_one(name: str, fraction: float, args, models: dict, common: list[str]) -> dict:
    from mmvssl.commands.finetune import finetune_config
    from mmvssl.evaluation.classifier import evaluate_classifier
    from mmvssl.evaluation.features import ExtractOptions
    from mmvssl.models.classifier import load_classifier
    from mmvssl.train.engine import pretrain
    out = Path(args.out) / f"{name}-{fraction:g}"
    labels = [f"data.labelled_fraction={fraction}"]
    if name in ("tg", "cmpl"):
        cfg = load_config(data_path("configs", "methods", f"{name}.yaml"),
                          [f"data.shards={args.train}", f"train.output_dir={out}", f"method.options.task={args.task}",
                           *labels, *common])
    else:
        cfg = finetune_config(models[name], args.train, args.task, str(out),
                              overrides=[*labels, "data.labelled_share=1.0", "method.options.eval_every=0", *common])
    tic = time.perf_counter()
    final = pretrain(cfg)
    seconds = time.perf_counter() - tic
    report = evaluate_classifier(load_classifier(final), args.test, str(out / "eval"),
                                 ExtractOptions(num_clips=args.clips, num_crops=args.crops))
    row = {"run": name, "fraction": fraction, "init": models.get(name, "random"), "steps": cfg.train.max_steps,
           "top1": report["top1"], "top5": report["top5"], "mean_class_acc": report["mean_class_acc"],
           "chance_top1": report["chance_top1"], "train_seconds": round(seconds, 1), "model": str(final),
           **pseudo_label_shares(out / "metrics.jsonl")}
    print(f"{name} @ {fraction:g}: top1 {row['top1']:.1f}  mean class {row['mean_class_acc']:.1f}  "
          f"({seconds:.0f} s)", flush=True)
    return row


def markdown(rows: list[dict], args) -> str:
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    names = list(dict.fromkeys(r["run"] for r in rows))
    by = {(r["run"], r["fraction"]): r for r in rows}
    head = "| run | init | " + " | ".join(f"top-1 @ {f:.0%} labels | vs supervised" for f in fractions) + " |"
    lines = [head, "|---|---|" + "---:|---:|" * len(fractions)]
    for name in names:
        cells = []
        for f in fractions:
            r, base = by.get((name, f)), by.get(("supervised", f))
            if r is None:
                cells += ["", ""]
                continue
            delta = "" if base is None or name == "supervised" else f"{r['top1'] - base['top1']:+.1f}"
            cells += [f"{r['top1']:.1f}", delta]
        init = next(r["init"] for r in rows if r["run"] == name)
        lines.append(f"| {name} | {init} | " + " | ".join(cells) + " |")
    chance = rows[0]["chance_top1"] if rows else 0
    steps = rows[0]["steps"] if rows else 0
    lines += ["", f"Val top-1 (%) on {args.test}, {args.clips} clip(s) x {args.crops} crop(s) per video; chance "
              f"{chance:.1f}. {steps} steps per run; train seconds: "
              + ", ".join(f"{r['run']}@{r['fraction']:g} {r['train_seconds']:.0f}" for r in rows) + "."]
    passed = [f"{r['run']}@{r['fraction']:g} {key.replace('pseudo_label_share', 'share')} mean {v['mean']:.3f}, "
              f"max {v['max']:.3f}, above 0 at {v['steps_above_0']} of {v['logged_steps']} logged steps"
              for r in rows for key, v in r.items() if key.startswith("pseudo_label_share")]
    if passed:
        lines += ["", "Unlabelled samples whose pseudo-label passed the threshold (`pseudo_label_share` in "
                  "metrics.jsonl): " + "; ".join(passed) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="demo")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--demo-model", default="runs/demo/train/model")
    p.add_argument("--rgb-model", default="runs/methods-evidence/simclr")
    p.add_argument("--runs", nargs="+", default=["supervised", "finetune-demo", "finetune-rgb", "tg", "cmpl"])
    p.add_argument("--clips", type=int, default=1)
    p.add_argument("--crops", type=int, default=1, choices=(1, 3))
    p.add_argument("--set", dest="overrides", nargs="+", default=[], help="config overrides for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {"supervised": "video-tiny"}
    if "finetune-demo" in args.runs:
        models["finetune-demo"] = args.demo_model
    if "finetune-rgb" in args.runs:
        models["finetune-rgb"] = str(rgb_model_folder(Path(args.rgb_model), out))
    common = [f"train.max_steps={args.steps}", f"train.warmup_steps={max(1, args.steps // 10)}",
              f"train.save_every={args.steps}", "train.keep_last=1", "train.log_with=none", "train.log_every=1",
              *args.overrides]
    rows = []
    for fraction in args.fractions:
        for name in args.runs:
            rows.append(run_one(name, fraction, args, models, common))
            (out / "labels_evidence.json").write_text(json.dumps(rows, indent=2))
    md = markdown(rows, args)
    (out / "labels_evidence.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
