"""Zero-shot retrieval between every pair of modalities the model embeds together.

Text <-> video meet in the `vat` space and audio <-> video in `va` (MMV's FAC). A text query
is relevant to every clip whose caption is identical (same words, same content), so duplicate
captions do not make the task look harder than it is; audio and video are relevant to their own
clip only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.loader import SampleSpec, build_loader
from ..models.multimodal import MultimodalModel
from .metrics import retrieval_metrics


@torch.no_grad()
def extract_embeddings(model: MultimodalModel, shards: str, spec: SampleSpec, batch_size: int = 32,
                       num_workers: int = 0) -> dict:
    """One centre window per sample; the caption (first text candidate) as the text."""
    model.eval()
    keys, captions, has_audio, has_text = [], [], [], []
    feats: dict[str, list[torch.Tensor]] = {"video_va": [], "video_vat": [], "audio_va": [], "text_vat": []}
    loader = build_loader(shards, spec, batch_size, num_workers, max_error_rate=1.0)
    failed = 0
    for batch in loader:
        failed += int(batch["failed"])
        out = model({"video": batch["video"], "audio": batch["audio"], "text": batch["text"][:, :1]})
        for name in feats:
            if name in out:
                feats[name].append(out[name][:, 0] if name == "text_vat" else out[name])
        keys += batch["key"]
        captions += [m.get("caption") or "" for m in batch["meta"]]
        has_audio.append(batch["has_audio"])
        has_text.append(batch["has_text"])
    if not keys:
        raise ValueError(f"no decodable samples in {shards}")
    result = {name: torch.cat(v) for name, v in feats.items() if v}
    result.update(keys=keys, captions=captions, has_audio=torch.cat(has_audio), has_text=torch.cat(has_text),
                  failed=failed)
    return result


def _pair(queries: torch.Tensor, items: torch.Tensor, relevant: torch.Tensor, q_ok: torch.Tensor,
          i_ok: torch.Tensor) -> dict:
    relevant = relevant[q_ok][:, i_ok]
    keep = relevant.any(dim=1)
    sim = queries[q_ok][keep] @ items[i_ok].T
    return retrieval_metrics(sim, relevant[keep])


def retrieval_report(emb: dict) -> dict:
    n = len(emb["keys"])
    identity = torch.eye(n, dtype=torch.bool)
    everyone = torch.ones(n, dtype=torch.bool)
    results = {}
    if "text_vat" in emb and "video_vat" in emb and bool(emb["has_text"].any()):
        caption_ids = {c: i for i, c in enumerate(dict.fromkeys(emb["captions"]))}
        ids = torch.tensor([caption_ids[c] for c in emb["captions"]])
        same_caption = ids[:, None] == ids[None, :]  # (n, n) text i relevant to video j
        results["t2v"] = _pair(emb["text_vat"], emb["video_vat"], same_caption, emb["has_text"], everyone)
        results["v2t"] = _pair(emb["video_vat"], emb["text_vat"], same_caption, everyone, emb["has_text"])
    if "audio_va" in emb and "video_va" in emb and bool(emb["has_audio"].any()):
        results["a2v"] = _pair(emb["audio_va"], emb["video_va"], identity, emb["has_audio"], everyone)
        results["v2a"] = _pair(emb["video_va"], emb["audio_va"], identity, emb["has_audio"], emb["has_audio"])
    return {"retrieval": results, "chance_R@1": 100.0 / n, "num_samples": n, "failed_samples": emb["failed"]}


def format_table(report: dict) -> str:
    lines = [f"{'task':<6}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}{'chance R@1':>12}{'queries':>9}"]
    for task, m in report["retrieval"].items():
        lines.append(f"{task:<6}{m['R@1']:>8.1f}{m['R@5']:>8.1f}{m['R@10']:>8.1f}{m['MedR']:>8.1f}"
                     f"{m['chance_R@1']:>12.2f}{m['num_queries']:>9d}")
    return "\n".join(lines)


def eval_spec(model: MultimodalModel) -> SampleSpec:
    """Sample as the model was trained (its config.json's `sampling`), one centre window."""
    video_cfg, text_cfg = model.config.get("video", {}), model.config.get("text", {})
    sampling = model.config.get("sampling", {})
    return SampleSpec(num_frames=sampling.get("num_frames", video_cfg.get("num_frames", 8)),
                      fps=sampling.get("fps", 4.0), size=sampling.get("size", video_cfg.get("image_size", 224)),
                      audio_rate=sampling.get("audio_rate", 16000),
                      context_length=text_cfg.get("context_length", 77), num_candidates=1, train=False)


def run_retrieval(model_dir: str, shards: str, out_dir: str, batch_size: int = 32, num_workers: int = 0) -> dict:
    from ..models.presets import load_model
    model = load_model(model_dir)
    spec = eval_spec(model)
    report = retrieval_report(extract_embeddings(model, shards, spec, batch_size, num_workers))
    report.update(model=str(model_dir), data=str(shards), preset=model.name,
                  sampling={"num_frames": spec.num_frames, "fps": spec.fps, "size": spec.size,
                            "audio_rate": spec.audio_rate, "window": "centre"})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
