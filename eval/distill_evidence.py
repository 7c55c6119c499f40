"""Does image-teacher distillation help? One script, all the numbers.

1. A teacher that carries signal the student lacks: a tiny open_clip ModifiedResNet (built from a
   config, nothing downloaded) trained to name the shape in each demo frame, saved to a local
   file and loaded back through `teacher.pretrained=<file>` (the path a real checkpoint takes).
2. The same student (vatt-tiny, 8 x 8 patches through a conv stem) trained for N steps from the
   same seed three times: configs/demo/tiny.yaml (plain: MMV's contrastive terms),
   configs/demo/distill.yaml with that teacher (`teacher.arch=<json> teacher.pretrained=<file>`:
   the contrastive terms plus per-frame and clip distillation) and distill.yaml with only its
   distillation terms.
3. Linear probe and kNN of each on the demo shards (train -> val), as compare_random_init.py.

    .venv/bin/python eval/distill_evidence.py --train runs/demo/shards/train --test runs/demo/shards/val \
        --out runs/demo/distill-evidence            # 400 teacher + 3 x 600 student steps (~25 min, 2 cores)

`--teacher-only` trains and saves the teacher alone and prints the `--set` overrides that hand it to
another config (docs/methods.md's iBoot evidence uses them with eval/methods_evidence.py).

Prints the table and writes OUT/report.json / report.md / report.html.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mmvssl.config import load_config, to_dict
from mmvssl.data.loader import build_loader
from mmvssl.errors import MmvsslError
from mmvssl.evaluation.features import extract_features
from mmvssl.evaluation.protocols import evaluate_probe
from mmvssl.evaluation.report import write_report
from mmvssl.models.presets import load_model
from mmvssl.resources import data_path
from mmvssl.train.engine import pretrain, sample_spec

# A tiny open_clip ModifiedResNet (layers as a list): convolutions learn the demo shapes in a few
# hundred steps on CPU, where a ViT this small stays near chance.
TEACHER_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def _labels(batch: dict, classes: dict[str, int]) -> torch.Tensor:
    return torch.tensor([classes.setdefault(str(m.get("label")), len(classes)) for m in batch["meta"]])


def train_teacher(train: str, test: str, out: Path, steps: int, seed: int = 0) -> tuple[Path, Path, float]:
    """A tiny open_clip image model whose per-frame embedding is trained to name the demo shape;
    returns (model-config JSON, checkpoint, its per-frame accuracy on `test`)."""
    import open_clip
    from mmvssl.teacher.model import load_teacher
    arch = out / "distill-evidence-teacher.json"
    arch.write_text(json.dumps(TEACHER_CONFIG))
    open_clip.add_model_config(arch)
    torch.manual_seed(seed)
    clip = open_clip.create_model(arch.stem)
    weights = out / "teacher.pt"
    torch.save(clip.state_dict(), weights)
    teacher = load_teacher(str(arch), str(weights), precision="fp32")  # the same frame conversion as in training
    teacher.visual.requires_grad_(True)
    cfg = load_config(data_path("configs", "demo", "tiny.yaml"), [f"data.shards={train}", "data.num_workers=0"])
    classes: dict[str, int] = {}
    head = torch.nn.Linear(teacher.embed_dim, 16)
    opt = torch.optim.AdamW([*teacher.visual.parameters(), *head.parameters()], lr=1e-3)
    teacher.visual.train()  # ImageTeacher itself stays in eval mode; its network trains here
    loader = build_loader(train, sample_spec(cfg, train=True), batch_size=16)  # an endless seeded stream
    for step, batch in zip(range(steps), loader):
        labels = _labels(batch, classes)
        with torch.enable_grad():
            frames = teacher.embed_frames(batch["video"])["teacher_frames"]  # (B, T, D)
            loss = F.cross_entropy(head(frames).flatten(0, 1), labels.repeat_interleave(frames.shape[1]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if step % 20 == 0:
            print(f"teacher step {step}: cross-entropy {loss.item():.3f}")
    teacher.visual.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in build_loader(test, sample_spec(cfg, train=False), batch_size=32):
            labels = _labels(batch, classes)
            pred = head(teacher(batch["video"])["teacher_frames"]).argmax(-1)  # (B, T)
            correct += int((pred == labels[:, None]).sum())
            total += pred.numel()
    clip.visual.load_state_dict(teacher.visual.state_dict())
    torch.save(clip.state_dict(), weights)
    return arch, weights, correct / max(total, 1)


def distill_terms_only(config: str) -> str:
    """An `objective.terms=[...]` override keeping only the distillation terms of a demo config."""
    from mmvssl.losses.distill import DISTILL_LOSSES
    terms = to_dict(load_config(data_path("configs", "demo", config)).objective.terms)
    return "objective.terms=" + json.dumps([t for t in terms if t["loss"] in DISTILL_LOSSES])


def train_student(config: str, train: str, out: Path, steps: int, extra: list[str], reuse: bool = False) -> Path:
    if reuse and (out / "model" / "model.safetensors").is_file():
        return out / "model"
    cfg = load_config(data_path("configs", "demo", config), [
        f"data.shards={train}", f"train.max_steps={steps}", f"train.output_dir={out}", "train.save_every=0",
        "train.log_with=none", f"train.warmup_steps={max(1, steps // 10)}", *extra])
    return pretrain(cfg)


def probe(model_dir: Path, train: str, test: str, features: list[str]) -> dict:
    model = load_model(model_dir)
    cache = {"train": extract_features(model, train, None), "test": extract_features(model, test, None)}
    results = {}
    for feature in features:
        for kind in ("linear", "knn"):
            r = evaluate_probe(kind, model, cache["train"], cache["test"], None, feature=feature)
            results[f"{kind} {feature}"] = {k: r[k] for k in ("top1", "top5", "mean_class_acc", "chance_top1",
                                                              "chance_top5", "num_samples", "num_classes")}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600, help="student steps, the same for both (the demo's 600)")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--patch", type=int, default=8, help="the student's spatial patch (vatt-tiny: 16; 8 gives "
                   "the per-frame tokens an 8 x 8 grid at the demo's 64 px)")
    p.add_argument("--stem", default="conv", choices=["conv", "patch"],
                   help="the student's patch embedding: conv (a convolutional stem) or patch (linear). With the "
                        "linear one the student hardly learns the demo's shapes in 600 steps, with or without a teacher")
    p.add_argument("--seed", type=int, default=0, help="teacher and students")
    p.add_argument("--features", nargs="+", default=["video_pooled", "video_vat"])
    p.add_argument("--reuse", action="store_true", help="keep the teacher and students already under --out")
    p.add_argument("--teacher-only", action="store_true",
                   help="train and save the teacher only, and print the overrides that give it to a config "
                        "(e.g. configs/methods/iboot.yaml through eval/methods_evidence.py --set)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        arch, weights = out / "distill-evidence-teacher.json", out / "teacher.pt"
        teacher_accuracy = None
        if not (args.reuse and weights.is_file()):
            arch, weights, teacher_accuracy = train_teacher(args.train, args.test, out, args.teacher_steps, args.seed)
            print(f"teacher per-frame shape accuracy on {args.test}: {100 * teacher_accuracy:.1f}%")
        if args.teacher_only:
            print(f"teacher: --set teacher.arch={arch} --set teacher.pretrained={weights} --set teacher.image_size=0")
            return 0
        student = [f"model.overrides.video.patch=[2,{args.patch},{args.patch}]",
                   f"model.overrides.video.stem={args.stem}", f"train.seed={args.seed}"]
        with_teacher = [*student, f"teacher.arch={arch}", f"teacher.pretrained={weights}"]
        students = {
            "plain": train_student("tiny.yaml", args.train, out / "plain", args.steps, student, args.reuse),
            "distilled": train_student("distill.yaml", args.train, out / "distilled", args.steps, with_teacher,
                                       args.reuse),
            "distill only": train_student("distill.yaml", args.train, out / "distill-only", args.steps,
                                          [*with_teacher, distill_terms_only("distill.yaml")], args.reuse)}
        results = {f"{name} ({label})": r for label, folder in students.items()
                   for name, r in probe(folder, args.train, args.test, args.features).items()}
    except MmvsslError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"protocol": "distill_evidence", "data": {"train": args.train, "test": args.test},
              "config": {"steps": args.steps, "teacher_steps": args.teacher_steps, "teacher": TEACHER_CONFIG,
                         "student_patch": args.patch, "student_stem": args.stem, "seed": args.seed},
              "teacher_val_frame_accuracy": teacher_accuracy,
              "results": results}
    print(f"{'protocol':<40}{'top1':>8}{'chance top1':>13}")
    for name, r in results.items():
        print(f"{name:<40}{r['top1']:>8.1f}{r['chance_top1']:>13.1f}")
    write_report(out, report, "distilled vs plain student")
    print(f"report: {out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
