"""The evaluation protocols end to end: model + data (shards or a feature file) -> numbers ->
report folder. Each `evaluate_*` works on a loaded model and returns the report dict; `run_*`
loads the model from its folder. The CLI (mmvssl/commands/evaluate.py) calls these."""

from __future__ import annotations

import html
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import MmvsslError
from . import plots
from .features import ExtractOptions, data_name, features_for, model_info, require
from .knn import knn_classify
from .linear_probe import linear_probe
from .metrics import query_ranks
from .report import write_report
from .retrieval import load_relevancy, mir_from_relevancy, retrieval_directions
from .tasks import Task, match_labels
from .thumbnails import middle_frame, read_videos
from .zeroshot import class_embeddings, zeroshot_classify


def _load(model_or_dir):
    if isinstance(model_or_dir, (str, Path)):
        from ..models.presets import load_model
        return load_model(model_or_dir), str(model_or_dir)
    return model_or_dir, None


def _base(model, model_path, data, protocol: str, config: dict) -> dict:
    return {"protocol": protocol, "model": model_info(model, model_path), "data": data, "config": config}


# ---- retrieval

def _examples_html(emb: dict, directions: dict, num_queries: int = 4) -> str:
    """A few text->video queries with their top-5 clips as middle-frame thumbnails (every caption
    is a t2v query, so row q of the t2v similarity is caption q)."""
    if "t2v" not in directions or "text_captions" not in emb:
        return ""
    _, sim, rel = directions["t2v"]
    picks = torch.linspace(0, sim.shape[0] - 1, min(num_queries, sim.shape[0])).round().long().tolist()
    top = {q: sim[q].topk(min(5, sim.shape[1])).indices.tolist() for q in picks}
    needed = {emb["keys"][j]: emb["sources"][j] for q in picks for j in top[q]}
    videos = read_videos(needed)
    parts = ["<h2>text &rarr; video: queries and their top-5 clips (green: relevant)</h2>"]
    for q in picks:
        parts.append(f"<div class='q'><b>{html.escape(emb['text_captions'][q])}</b><br>")
        for j in top[q]:
            key = emb["keys"][j]
            meta = emb["metas"][j] if "metas" in emb else {}
            frame = middle_frame(videos[key], meta.get("duration")) if key in videos else None
            img = f"<img src='data:image/png;base64,{plots.thumbnail(frame)}'><br>" if frame is not None else ""
            cls = "r hit" if bool(rel[q, j]) else "r"
            parts.append(f"<div class='{cls}'>{img}{html.escape(key)}: {html.escape(emb['captions'][j])}</div>")
        parts.append("</div>")
    return "".join(parts)


def evaluate_retrieval(model, data: str, out_dir: str, options: ExtractOptions | None = None,
                       model_path: str | None = None, relevancy: str | None = None) -> dict:
    options = options or ExtractOptions()
    emb = features_for(model, data, options, model_path)
    directions = retrieval_directions(emb)
    if not directions:
        raise MmvsslError(f"{data}: nothing to retrieve; the model and data share no pair of modalities "
                          f"(need captions or audio beside the video)")
    n = len(emb["keys"])
    report = _base(model, model_path, data_name(data), "retrieval", {"extract": emb["info"]["sampling"],
                                                           "relevancy": relevancy})
    report.update(retrieval={name: m for name, (m, _, _) in directions.items()}, **{"chance_R@1": 100.0 / n},
                  num_samples=n, failed_samples=emb["failed"], preset=model.name, sampling=emb["info"]["sampling"])
    if relevancy:
        rel = load_relevancy(relevancy)
        from ..data.text import tokenizer_for
        tok = tokenizer_for(model, model.config.get("text", {}).get("context_length", 77))
        with torch.no_grad():
            texts = torch.cat([model.eval().encode_text(tok(rel["texts"][i:i + 256]), space="vat")
                               for i in range(0, len(rel["texts"]), 256)])
        report["mir"] = mir_from_relevancy(emb, rel, texts)
    figures = []
    for name, (_, sim, _) in directions.items():
        if name in ("t2v", "a2v"):
            figures.append((f"{name} similarity (queries x items)", plots.similarity_heatmap(sim, f"{name} similarity")))
    ranks = {name: query_ranks(sim, rel).float() for name, (_, sim, rel) in directions.items()}
    figures.append(("recall@K", plots.recall_curves(ranks, {k: s.shape[1] for k, (_, s, _) in directions.items()})))
    if any(label is not None for label in emb["labels"]):
        labels = [str(label) for label in emb["labels"]]
        figures.append(("video embeddings (vat), PCA", plots.projection_plot(emb["video_vat"], labels, "video vat, PCA")))
    write_report(out_dir, report, f"retrieval: {model.name} on {data_name(data)}", figures, _examples_html(emb, directions))
    return report


# ---- classification

def targets_for(features: dict, classes: list[str], where: str, class_source: str, label_key: str) -> torch.Tensor:
    labels = features["labels"] if label_key == "label" else [m.get(label_key) for m in features["metas"]]
    return torch.tensor(match_labels(labels, classes, where, class_source, label_key), dtype=torch.long)


def _classification_figures(report: dict, classes: list[str], embeddings: torch.Tensor, targets: torch.Tensor,
                            name: str) -> list:
    return [(f"confusion matrix ({name})", plots.confusion_plot(report["confusion"], classes, f"{name}: confusion")),
            (f"{name} features, PCA, coloured by true class",
             plots.projection_plot(embeddings, [classes[t] for t in targets.tolist()], f"{name} features, PCA"))]


def evaluate_zeroshot(model, data: str, out_dir: str, task: Task, options: ExtractOptions | None = None,
                      model_path: str | None = None) -> dict:
    features = features_for(model, data, options, model_path)
    name = f"{task.modality}_vat"
    embeddings = require(features, name, data, f"zero-shot {task.modality} classification")
    targets = targets_for(features, task.classes, data, task.source, task.label_key)
    if task.modality == "audio":
        ok = features["has_audio"]
        embeddings, targets = embeddings[ok], targets[ok]
    weights = class_embeddings(model, task.classes, task.templates)
    metrics, scores = zeroshot_classify(embeddings, targets, weights)
    report = _base(model, model_path, data_name(data), "zeroshot", {"task": task.name, "modality": task.modality,
                                                          "templates": task.templates, "classes": task.source,
                                                          "extract": features["info"]["sampling"]})
    report.update(metrics, classes=task.classes)
    figures = _classification_figures(report, task.classes, embeddings, targets, f"zero-shot {task.modality}")
    figures.append(("clip x class similarity", plots.similarity_heatmap(scores[targets.argsort()], "clip x class")))
    write_report(out_dir, report, f"zero-shot {task.name}: {model.name}", figures)
    return report


def _train_test(model, train: str, test: str, classes: list[str] | None, class_source: str, label_key: str,
                feature: str, options, model_path):
    tr = features_for(model, train, options, model_path)
    te = features_for(model, test, options, model_path)
    train, test = data_name(train), data_name(test)
    if classes is None:
        labels = tr["labels"] if label_key == "label" else [m.get(label_key) for m in tr["metas"]]
        if any(label is None for label in labels):
            raise MmvsslError(f"{train}: some samples have no '{label_key}' in their metadata")
        classes, class_source = sorted({str(label) for label in labels}), f"labels of {train}"
    x_train, x_test = require(tr, feature, train, "the probe"), require(te, feature, test, "the probe")
    y_train = targets_for(tr, classes, train, class_source, label_key)
    y_test = targets_for(te, classes, test, class_source, label_key)
    if feature.startswith("audio"):
        x_train, y_train = x_train[tr["has_audio"]], y_train[tr["has_audio"]]
        x_test, y_test = x_test[te["has_audio"]], y_test[te["has_audio"]]
    return classes, x_train, y_train, x_test, y_test, te["info"]["sampling"]


def evaluate_probe(kind: str, model, train, test, out_dir: str | None, classes: list[str] | None = None,
                   class_source: str = "", label_key: str = "label", feature: str = "video_pooled",
                   options: ExtractOptions | None = None, model_path: str | None = None, k: int = 20,
                   temperature: float = 0.07) -> dict:
    """kind 'linear' (logistic regression, weight decay from a held-out sweep) or 'knn'; train and
    test are shards, feature files or feature sets in memory."""
    classes, x_train, y_train, x_test, y_test, sampling = _train_test(
        model, train, test, classes, class_source, label_key, feature, options, model_path)
    if kind == "linear":
        metrics, _ = linear_probe(x_train, y_train, x_test, y_test, len(classes))
        config = {"feature": feature, "standardise": True, "holdout": 0.2}
    elif kind == "knn":
        metrics, _ = knn_classify(x_train, y_train, x_test, y_test, len(classes), k, temperature)
        config = {"feature": feature, "k": k, "temperature": temperature, "similarity": "cosine"}
    else:
        raise ValueError(f"unknown probe '{kind}'")
    report = _base(model, model_path, f"train={data_name(train)} test={data_name(test)}", kind, {**config, "extract": sampling})
    report.update(metrics, classes=classes, num_train=int(len(y_train)))
    if out_dir:
        figures = _classification_figures(report, classes, x_test, y_test, f"{kind} ({feature})")
        write_report(out_dir, report, f"{kind} probe: {model.name}", figures)
    return report


# ---- suite

def _strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("confusion", "classes", "model", "config")}


def _run_protocol(protocol: str, model, task: Task, train, test, where: str, options, model_path, feature) -> dict:
    if protocol == "zeroshot":
        return evaluate_zeroshot(model, test, where, task, options, model_path)
    if protocol == "retrieval":
        return evaluate_retrieval(model, test, where, options, model_path, relevancy=task.relevancy)
    if train is None:
        raise MmvsslError(f"{task.source}: protocol '{protocol}' needs training data; give --train SHARDS "
                          f"or set data.train in the task")
    return evaluate_probe(protocol, model, train, test, where, task.classes, task.source, task.label_key, feature,
                          options, model_path)


def _suite_over_splits(model, task: Task, pool: dict, out: Path, options, model_path, feature) -> dict:
    """Every protocol on every official split of one feature set; each split's numbers and the
    mean over splits (the number the papers report)."""
    from .splits import mean_over_splits, split_indices, subset_features
    parts = {}
    for split in task.splits:
        train_idx, test_idx = split_indices(pool, split, f"{task.source} ({data_name(pool)})")
        parts[split.name] = (subset_features(pool, train_idx, f"{split.name} train") if train_idx else None,
                             subset_features(pool, test_idx, f"{split.name} test"))
    results = {}
    for protocol in task.protocols:
        if protocol == "retrieval":
            results[protocol] = _strip(_run_protocol(protocol, model, task, None, pool, str(out / protocol), options,
                                                     model_path, feature))
            continue
        per_split = {name: _strip(_run_protocol(protocol, model, task, tr, te, str(out / protocol / name), options,
                                                model_path, feature))
                     for name, (tr, te) in parts.items()}
        results[protocol] = {**mean_over_splits(per_split), "splits": per_split,
                             "aggregate": f"mean over {len(per_split)} splits"}
    return results


def evaluate_suite(model, task: Task, out_dir: str, train: str | None = None, test: str | None = None,
                   options: ExtractOptions | None = None, model_path: str | None = None,
                   feature: str | None = None) -> dict:
    """Everything the task lists in `protocols`, features extracted once per split. A task with
    official `splits` (UCF101, HMDB51, ESC-50) takes one shard set holding every sample (`test`,
    or `train` when only that is given) and runs each split inside it."""
    from .features import save_features
    options = options or ExtractOptions()
    train, test = train or task.data.get("train"), test or task.data.get("test")
    if task.splits:
        train, test = None, test or train
    if not test:
        raise MmvsslError(f"{task.source}: no test data; give --test SHARDS or set data.test in the task")
    out = Path(out_dir)
    cached = {}
    for split, data in (("train", train), ("test", test)):
        if data and not str(data).endswith(".safetensors"):
            needs = split == "test" or any(p in task.protocols for p in ("linear", "knn"))
            if needs:
                path = out / "features" / f"{split}.safetensors"
                save_features(features_for(model, data, options, model_path), path)
                cached[split] = str(path)
        elif data:
            cached[split] = data
    feature = feature or f"{task.modality}_pooled"
    if task.splits:
        pool = features_for(model, cached["test"], options, model_path)
        results = _suite_over_splits(model, task, pool, out, options, model_path, feature)
    else:
        results = {protocol: _strip(_run_protocol(protocol, model, task, cached.get("train"), cached["test"],
                                                  str(out / protocol), options, model_path, feature))
                   for protocol in task.protocols}
    summary = _base(model, model_path, {"train": train, "test": test}, "suite",
                    {"task": task.name, "protocols": task.protocols, "extract": asdict(options), "feature": feature,
                     "splits": [s.name for s in task.splits]})
    summary["results"] = results
    write_report(out, summary, f"suite {task.name}: {model.name}")
    return summary
