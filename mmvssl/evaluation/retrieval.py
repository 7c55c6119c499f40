"""Zero-shot retrieval between every pair of modalities the model embeds together.

Text <-> video and text <-> audio meet in the `vat` space, audio <-> video in `va` (MMV's FAC).
Relevance: a caption is relevant to every clip that carries the identical caption (a clip may
carry several, MSR-VTT style: `captions` in its metadata), so duplicate captions do not make the
task look harder than it is, and video->text counts the best of a clip's captions; audio and
video are relevant to their own clip only. EK-100 MIR mAP / nDCG come from a graded relevancy
matrix supplied with the data (`mir_from_relevancy`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import MmvsslError
from .features import eval_spec  # noqa: F401  (kept importable from here)
from .metrics import retrieval_metrics
from .mir import mir_metrics

# direction -> (query embedding, item embedding); text rows are captions, the rest samples
PAIRS = {"t2v": ("text_vat", "video_vat"), "v2t": ("video_vat", "text_vat"),
         "a2v": ("audio_va", "video_va"), "v2a": ("video_va", "audio_va"),
         "t2a": ("text_vat", "audio_vat"), "a2t": ("audio_vat", "text_vat")}


def text_table(emb: dict) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Caption rows: embeddings (M, D), owner sample (M,), caption strings. A feature set from
    `extract_features` has one row per caption; a legacy dict has one per sample with text."""
    if "text_owner" in emb:
        return emb["text_vat"], emb["text_owner"], list(emb["text_captions"])
    owner = torch.nonzero(emb["has_text"]).flatten()
    return emb["text_vat"][owner], owner, [emb["captions"][i] for i in owner.tolist()]


def caption_relevance(owner: torch.Tensor, strings: list[str], num_samples: int) -> torch.Tensor:
    """(M, N) bool: caption m is relevant to sample j when j carries the identical caption."""
    ids = {s: i for i, s in enumerate(dict.fromkeys(strings))}
    caption_id = torch.tensor([ids[s] for s in strings], dtype=torch.long)
    carries = torch.zeros(num_samples, len(ids), dtype=torch.bool)  # (N, U)
    carries[owner, caption_id] = True
    return carries[:, caption_id].T


def _pair(queries, items, relevant, q_ok, i_ok) -> tuple[dict, torch.Tensor, torch.Tensor]:
    relevant = relevant[q_ok][:, i_ok]
    keep = relevant.any(dim=1)
    sim = queries[q_ok][keep] @ items[i_ok].T
    return retrieval_metrics(sim, relevant[keep]), sim, relevant[keep]


def retrieval_directions(emb: dict) -> dict:
    """Every direction the feature set supports -> (metrics, similarity, relevance)."""
    n = len(emb["keys"])
    samples = torch.ones(n, dtype=torch.bool)
    audio_ok = emb.get("has_audio", torch.zeros(n, dtype=torch.bool))
    out = {}
    have_text = "text_vat" in emb and bool(emb.get("has_text", samples).any())
    if have_text:
        texts, owner, strings = text_table(emb)
        rel = caption_relevance(owner, strings, n)  # (M, N)
        every_text = torch.ones(len(strings), dtype=torch.bool)
        if "video_vat" in emb:
            out["t2v"] = _pair(texts, emb["video_vat"], rel, every_text, samples)
            out["v2t"] = _pair(emb["video_vat"], texts, rel.T, samples, every_text)
    if "audio_va" in emb and "video_va" in emb and bool(audio_ok.any()):
        identity = torch.eye(n, dtype=torch.bool)
        out["a2v"] = _pair(emb["audio_va"], emb["video_va"], identity, audio_ok, samples)
        out["v2a"] = _pair(emb["video_va"], emb["audio_va"], identity, audio_ok, audio_ok)
    if have_text and "audio_vat" in emb and bool(audio_ok.any()):
        out["t2a"] = _pair(texts, emb["audio_vat"], rel, every_text, audio_ok)
        out["a2t"] = _pair(emb["audio_vat"], texts, rel.T, audio_ok, every_text)
    return out


def retrieval_report(emb: dict) -> dict:
    results = {name: metrics for name, (metrics, _, _) in retrieval_directions(emb).items()}
    n = len(emb["keys"])
    return {"retrieval": results, "chance_R@1": 100.0 / n, "num_samples": n, "failed_samples": emb["failed"]}


def load_relevancy(path: str | Path) -> dict:
    """An .npz (read without pickle) with `keys` (N,) sample keys, `texts` (M,) captions and
    `relevancy` (N, M) in [0, 1]: EK-100 MIR's relevancy matrix, converted once."""
    path = Path(path)
    if not path.is_file():
        raise MmvsslError(f"relevancy file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("keys", "texts", "relevancy") if k not in z.files]
        if missing:
            raise MmvsslError(f"{path}: missing array(s) {missing} (expected keys, texts, relevancy)")
        out = {"keys": [str(k) for k in z["keys"]], "texts": [str(t) for t in z["texts"]],
               "relevancy": torch.from_numpy(z["relevancy"].astype(np.float64))}
    if tuple(out["relevancy"].shape) != (len(out["keys"]), len(out["texts"])):
        raise MmvsslError(f"{path}: relevancy is {tuple(out['relevancy'].shape)}, expected "
                          f"({len(out['keys'])} keys, {len(out['texts'])} texts)")
    return out


def mir_from_relevancy(emb: dict, relevancy: dict, text_embeddings: torch.Tensor) -> dict:
    """EK-100 MIR mAP / nDCG: the relevancy's rows are samples (by shard key, or by the `id` in
    their metadata: the narration_id `datasets convert ek100-mir` writes), its columns the texts
    (embedded by the caller, (M, D) in vat)."""
    row = {k: i for i, k in enumerate(emb["keys"])}
    for i, meta in enumerate(emb.get("metas") or []):  # `datasets convert` keeps the dataset's id
        if isinstance(meta, dict) and meta.get("id") is not None:
            row.setdefault(str(meta["id"]), i)
    absent = [k for k in relevancy["keys"] if k not in row]
    if absent:
        raise MmvsslError(f"relevancy names {len(absent)} sample key(s) the data lacks, e.g. {absent[:3]}")
    videos = emb["video_vat"][[row[k] for k in relevancy["keys"]]]
    return mir_metrics(videos.double() @ text_embeddings.double().T, relevancy["relevancy"])


def format_table(report: dict) -> str:
    lines = [f"{'task':<6}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}{'MeanR':>8}{'chance R@1':>12}{'queries':>9}"]
    for task, m in report["retrieval"].items():
        lines.append(f"{task:<6}{m['R@1']:>8.1f}{m['R@5']:>8.1f}{m['R@10']:>8.1f}{m['MedR']:>8.1f}{m['MeanR']:>8.1f}"
                     f"{m['chance_R@1']:>12.2f}{m['num_queries']:>9d}")
    for name, m in report.get("mir", {}).items():
        lines.append(f"EK-100 MIR {name}: v2t {m['v2t']:.1f}  t2v {m['t2v']:.1f}  avg {m['avg']:.1f}  "
                     f"(chance {m['chance_avg']:.1f})")
    return "\n".join(lines)


def write_json(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return out / "report.json"
