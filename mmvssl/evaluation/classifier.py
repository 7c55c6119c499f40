"""A fine-tuned classifier scored on shards: every clip x crop of each video (multi-clip,
multi-crop testing: the views of evaluation.features.DecodeViews), the softmax averaged over a
video's views, then the classification metrics and report of the other protocols (top-1, top-5,
mean per-class, chance, confusion matrix; report.{json,md,html})."""

from __future__ import annotations

import torch
import webdataset as wds

from ..data.shardio import MemberLimits, list_shards, skip_unreadable_shard, tar_stage
from ..errors import MmvsslError
from . import plots
from .features import DecodeViews, ExtractOptions, _batches, eval_spec, model_info
from .accuracy import classification_metrics
from .report import write_report
from .tasks import match_labels


@torch.no_grad()
def classify_shards(model, shards: str, options: ExtractOptions | None = None,
                    limits: MemberLimits | None = None) -> dict:
    """{"scores": (N, C) mean softmax over views, "targets": (N,), "keys", "failed"} for `model` (a
    VideoClassifier) on every sample of `shards`; labels mapped as the evaluation maps them. Members
    over `limits` are refused from their tar header (one line) and their samples counted in `failed`."""
    options = options or ExtractOptions()
    spec = eval_spec(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pipeline = wds.DataPipeline(wds.SimpleShardList(list_shards(shards)), wds.split_by_worker,
                                tar_stage(skip_unreadable_shard, limits or options.limits), DecodeViews(spec, options),
                                lambda src: _batches(src, options.batch_size))
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=options.num_workers)
    scores, labels, keys, failed = [], [], [], 0
    for item in loader:
        failed += item["failed"]
        samples = item["samples"]
        if not samples:
            continue
        video = torch.stack([s["video"] for s in samples]).to(device)  # (B, V, C, T, H, W): clips x crops
        logits = model({"video": video})["logits"].float()  # (B, V, C)
        scores.append(logits.softmax(dim=-1).mean(dim=1).cpu())
        labels += [s["meta"].get(model.label_key) for s in samples]
        keys += [s["key"] for s in samples]
    model.train(was_training)
    if not keys:
        raise MmvsslError(f"no decodable samples in {shards} ({failed} failed to decode)")
    targets = match_labels(labels, model.classes, str(shards), model.task or "the classifier's classes",
                           model.label_key)
    return {"scores": torch.cat(scores), "targets": torch.tensor(targets, dtype=torch.long), "keys": keys,
            "failed": failed}


def evaluate_classifier(model, shards: str, out_dir: str | None, options: ExtractOptions | None = None,
                        model_path: str | None = None, extra: dict | None = None) -> dict:
    """Metrics of `model` on `shards`, and the report folder when `out_dir` is given."""
    options = options or ExtractOptions()
    result = classify_shards(model, shards, options)
    metrics = classification_metrics(result["scores"], result["targets"], len(model.classes))
    spec = eval_spec(model)
    report = {"protocol": "finetune", "model": model_info(model.backbone, model_path), "data": str(shards),
              "config": {"task": model.task, "label_key": model.label_key, "clips": options.num_clips,
                         "crops": options.num_crops, "aggregate": "mean softmax over views",
                         "sampling": {"num_frames": spec.num_frames, "fps": spec.fps, "size": spec.size},
                         **(extra or {})}}
    report.update(metrics, classes=model.classes, failed_samples=result["failed"])
    if out_dir:
        figures = [("confusion matrix", plots.confusion_plot(report["confusion"], model.classes,
                                                             "fine-tuned: confusion"))]
        write_report(out_dir, report, f"fine-tuned classifier: {model.name} on {shards}", figures)
    return report
