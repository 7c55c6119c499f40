"""Linear probe and kNN of a trained model beside the same protocols on a randomly initialised
model of the same preset: does pretraining help?

    .venv/bin/python eval/compare_random_init.py runs/demo/train/model \
        --train runs/demo/shards/train --test runs/demo/shards/val --out runs/demo/eval-random-init

Prints both and writes report.json / report.md / report.html with both side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mmvssl.errors import MmvsslError
from mmvssl.evaluation.features import (ExtractOptions, extract_features, load_features, model_fingerprint,
                                       model_info, save_features)
from mmvssl.evaluation.protocols import evaluate_probe
from mmvssl.evaluation.report import write_report
from mmvssl.models.multimodal import MultimodalModel
from mmvssl.models.presets import load_model


def compare(model_dir: str, train: str, test: str, out: str | None, features: list[str], seed: int = 0,
            options: ExtractOptions | None = None) -> dict:
    trained = load_model(model_dir)
    torch.manual_seed(seed)
    random_init = MultimodalModel(trained.config)  # same preset and sampling, fresh weights
    results = {}
    for label, model in (("trained", trained), ("random init", random_init)):
        cache = {split: _features(model, data, options, out, f"{label.replace(' ', '_')}_{split}")
                 for split, data in (("train", train), ("test", test))}
        for feature in features:
            for kind in ("linear", "knn"):
                r = _probe_on(kind, model, cache, feature)
                results[f"{kind} {feature} ({label})"] = {k: r[k] for k in
                                                         ("top1", "top5", "mean_class_acc", "chance_top1",
                                                          "chance_top5", "num_samples", "num_classes")}
    report = {"protocol": "compare_random_init", "model": model_info(trained, model_dir),
              "random_init_model": model_info(random_init),
              "data": {"train": train, "test": test},
              "config": {"features": features, "random_init_seed": seed, "k": 20, "temperature": 0.07},
              "results": results}
    if out:
        write_report(out, report, f"trained vs random init: {trained.name}")
    return report


def _features(model, data, options, out, name):
    """Extract, or reuse OUT/features/NAME.safetensors when it was written by this very model."""
    path = Path(out) / "features" / f"{name}.safetensors" if out else None
    if path is not None and path.is_file():
        features = load_features(path)
        if features["info"]["model"]["fingerprint"] == model_fingerprint(model) and features["info"]["data"] == str(data):
            return features
    features = extract_features(model, data, options)
    if path is not None:
        save_features(features, path)
    return features


def _probe_on(kind, model, cache, feature):
    return evaluate_probe(kind, model, cache["train"], cache["test"], None, feature=feature)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out")
    p.add_argument("--features", nargs="+", default=["video_pooled", "video_va", "audio_pooled", "audio_va"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        report = compare(args.model, args.train, args.test, args.out, args.features, args.seed)
    except MmvsslError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'protocol':<36}{'top1':>8}{'top5':>8}{'chance top1':>13}")
    for name, r in report["results"].items():
        print(f"{name:<36}{r['top1']:>8.1f}{r['top5']:>8.1f}{r['chance_top1']:>13.1f}")
    if args.out:
        print(f"report: {args.out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
