"""Every RGB method trained for the same budget on the same shards, then linear probe and kNN of
its pooled video features on the val split, beside a random initialisation of the same model.

    .venv/bin/python eval/methods_evidence.py --train runs/demo/shards/train --test runs/demo/shards/val \
        --out runs/methods-evidence [--steps 300] [--methods simclr cvrl svt] [--set data.batch_size=16] \
        [--label shape motion]

Each method is `configs/methods/<name>.yaml` as shipped, with data.shards, train.max_steps and
train.output_dir set here (and data.batch_size / train.lr when given); the probes are those of
eval/compare_random_init.py on `video_pooled`, the encoder's output before any head, for each
metadata key of `--label` (default `label`; the demo samples also carry `shape`, `color` and
`motion`), every label probed on the same trained model. Prints one table and writes
OUT/methods_evidence.json and .md (docs/methods.md quotes it).

    .venv/bin/python eval/methods_evidence.py --collect runs/ev/a runs/ev/b ... --out runs/ev/table

joins the rows of earlier runs of this script (each DIR/methods_evidence.json) into one table, a
method's rows from a later folder replacing an earlier one's, each row naming its folder; the runs
must share train and test shards and the step budget (checked).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from mmvssl.config import load_config
from mmvssl.errors import MmvsslError
from mmvssl.resources import data_path

FEATURE = "video_pooled"
RANDOM_PROBES: dict[tuple[str, str, str], dict] = {}  # (random init's fingerprint name, label, probe) -> result


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_random_init", data_path("eval", "compare_random_init.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rgb_methods() -> list[str]:
    """The configs under configs/methods/ built on the RGB base (video only) that train on the demo
    shards as they are (a config that needs cached flow, `data.flow: true`, needs `shards add-flow`)."""
    names = []
    for path in sorted(data_path("configs", "methods").glob("*.yaml")):
        cfg = load_config(path)
        if cfg.model.preset == "video-tiny" and not cfg.data.get("flow", False):
            names.append(path.stem)
    return names


def run(method: str, train: str, test: str, out: Path, steps: int, overrides: list[str],
        labels: tuple[str, ...] = ("label",), reuse: bool = False) -> list[dict]:
    """Train `method` for `steps`, then one row per label key: its probes beside a random init."""
    import mmvssl
    import torch

    from mmvssl.evaluation.features import model_fingerprint
    from mmvssl.evaluation.protocols import evaluate_probe
    from mmvssl.models.multimodal import MultimodalModel
    from mmvssl.train.engine import pretrain
    cfg = load_config(data_path("configs", "methods", f"{method}.yaml"),
                      [f"data.shards={train}", f"train.max_steps={steps}", f"train.output_dir={out / method}",
                       f"train.save_every={steps}", "train.log_with=none", *overrides])
    tic = time.perf_counter()
    model_dir = out / method / "model"
    if reuse and (model_dir / "config.json").is_file():  # probe a model this script trained before, with new labels
        log = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if not log or log[-1]["step"] != steps:
            raise MmvsslError(f"{out / method}: the saved model was trained for {log[-1]['step'] if log else 0} steps, "
                              f"not --steps {steps}")
        minutes = float("nan")
    else:
        model_dir = pretrain(cfg)
        minutes = (time.perf_counter() - tic) / 60
    compare = _compare_module()
    trained = mmvssl.load_model(model_dir)
    torch.manual_seed(0)
    random_init = MultimodalModel(trained.config)  # same preset and sampling, fresh weights (as compare's)
    rows = []
    for label in labels:
        row = {"method": method, "name": cfg.method.name, "label": label, "steps": steps,
               "train_minutes": round(minutes, 2)}
        for which, model in (("", trained), ("_random", random_init)):
            # a random init's features are shared by the methods whose model config is the same
            # (the file is named by the model's fingerprint: config and weights)
            where, name = ((out / method / "eval", "trained") if not which else
                           (out / "random_init", f"random_{model_fingerprint(model)}"))
            cache = {split: compare._features(model, data, None, str(where), f"{name}_{split}")
                     for split, data in (("train", train), ("test", test))}
            for kind in ("linear", "knn"):
                memo = (name, label, kind) if which else None  # a shared random init is probed once
                r = RANDOM_PROBES.get(memo) or evaluate_probe(kind, model, cache["train"], cache["test"], None,
                                                              label_key=label, feature=FEATURE)
                if memo:
                    RANDOM_PROBES[memo] = r
                row[f"{kind}{which}"] = r["top1"]
                row["chance"] = r["chance_top1"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    run = any("run" in r for r in rows)  # a collected table names each row's run folder
    lines = ["| method (config) | label | steps | linear top-1 | random init | kNN top-1 | random init | chance | "
             "beats random init |" + (" run |" if run else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if run else "")]
    for r in rows:
        beats = "yes" if r["linear"] > r["linear_random"] and r["knn"] > r["knn_random"] else (
            "linear only" if r["linear"] > r["linear_random"] else "kNN only" if r["knn"] > r["knn_random"] else "no")
        lines.append(f"| {r['method']} ({r['name']}) | {r['label']} | {r['steps']} | {r['linear']:.1f} | "
                     f"{r['linear_random']:.1f} | {r['knn']:.1f} | {r['knn_random']:.1f} | {r['chance']:.1f} | {beats} |"
                     + (f" {r.get('run', '')} |" if run else ""))
    if rows:
        lines.append(f"\nFeature: `{FEATURE}`.")
    return "\n".join(lines)


def collect(folders: list[str]) -> tuple[dict, list[dict]]:
    """The rows of earlier runs, one per (method, label), later folders first; with their folder."""
    header, rows = None, {}
    for folder in folders:
        path = Path(folder) / "methods_evidence.json"
        if not path.is_file():
            raise MmvsslError(f"{path}: not found (a run of this script writes it when every method is done)")
        run = json.loads(path.read_text())
        for key in ("train", "test"):
            if header and run[key] != header[key]:
                raise MmvsslError(f"{path}: {key} is {run[key]}, not {header[key]} as in {header['from']}: "
                                  f"rows of other data do not belong in one table")
        header = header or {"train": run["train"], "test": run["test"], "from": str(path)}
        for row in run["rows"]:
            rows[(row["method"], row["label"])] = {**row, "run": folder}
    steps = {r["steps"] for r in rows.values()}
    if len(steps) > 1:
        raise MmvsslError(f"the runs have different step budgets {sorted(steps)}: one table needs one budget")
    order = sorted(rows.values(), key=lambda r: (r["label"], r["method"]))
    return {"train": header["train"], "test": header["test"], "collected": folders}, order


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train")
    p.add_argument("--test")
    p.add_argument("--collect", nargs="+", metavar="DIR",
                   help="join the rows of earlier runs (DIR/methods_evidence.json) into one table in --out")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--methods", nargs="+", help="config names under configs/methods/ (default: every RGB one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override applied to every method, e.g. --set data.batch_size=16 (repeatable)")
    p.add_argument("--label", nargs="+", default=["label"],
                   help="metadata key(s) to probe, each on the same trained model (demo: label/shape, color, motion)")
    p.add_argument("--reuse", action="store_true",
                   help="probe the model already in OUT/<method>/model (trained by this script for --steps) "
                        "instead of training again")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.collect:
        try:
            header, rows = collect(args.collect)
        except MmvsslError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        (out / "methods_evidence.json").write_text(json.dumps({**header, "rows": rows}, indent=2))
        text = table(rows)
        (out / "methods_evidence.md").write_text(text + "\n")
        print(text)
        return 0
    if not (args.train and args.test):
        p.error("--train and --test are required (or --collect)")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for method in args.methods or rgb_methods():
            for row in run(method, args.train, args.test, out, args.steps, args.overrides, tuple(args.label),
                           args.reuse):
                rows.append(row)
                print(json.dumps(row), flush=True)
    except MmvsslError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "methods_evidence.json").write_text(json.dumps({"train": args.train, "test": args.test, "rows": rows},
                                                          indent=2))
    text = table(rows)
    (out / "methods_evidence.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
