"""Does search find the right moments? On `make demo`'s val videos with its model:

1. text: for every (colour, shape) pair of the val set, the query "a {colour} {shape}"; a hit when
   the first result's video shows that shape in that colour. Chance: the fraction of indexed
   windows that match (each pair has 4 of the 120 clips, one per motion).
2. audio: every val clip's first window's sound as the query (`--audio FILE --start 0 --end 2`); the
   first result from another video should show the same object (the shape sets the kind of sound,
   the colour its pitch). Scored against the windows' sound (the default) and, for comparison,
   against their pictures (the cross-modal video-audio space).

    .venv/bin/python eval/search_evidence.py runs/demo/train/model --videos runs/demo/data/val \\
        [--index runs/demo/search-index] [--out runs/demo/search-evidence.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmvssl.search.index import build_index  # noqa: E402
from mmvssl.search.query import Searcher, Term  # noqa: E402


def first_other(results: list[dict], own: str) -> dict | None:
    return next((r for r in results if r["video"] != own), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--videos", required=True, help="the val folder of `mmvssl data synth` (videos/, captions.jsonl)")
    ap.add_argument("--index", default="runs/demo/search-index")
    ap.add_argument("--out", default="runs/demo/search-evidence.json")
    args = ap.parse_args()
    root = Path(args.videos)
    labels = {}
    for line in (root / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        labels[Path(row["video"]).name] = (row["color"], row["shape"])
    counts = build_index(args.model, str(root / "videos"), args.index, progress=False)
    searcher = Searcher(args.index)
    windows = searcher.db.execute("SELECT v.source FROM windows w JOIN videos v ON v.id = w.video_id").fetchall()
    sources = [Path(s).name for (s,) in windows]

    # 1. text queries naming a colour and a shape
    pairs = sorted({labels[s] for s in sources})
    hits, chance, top5 = 0, 0.0, 0.0
    for colour, shape in pairs:
        results = searcher.query(text=f"a {colour} {shape}", k=5)
        match = [labels[Path(r["video"]).name] == (colour, shape) for r in results]
        hits += match[0]
        top5 += sum(match) / len(match)
        chance += sum(labels[s] == (colour, shape) for s in sources) / len(sources)
    text = {"queries": len(pairs), "top1": hits / len(pairs), "chance": chance / len(pairs),
            "precision_at_5": top5 / len(pairs)}
    text["top1_over_chance"] = text["top1"] / text["chance"]

    # 2. a clip's sound as the query; the first result from another video
    audio = {}
    videos = sorted(set(sources))
    for name, space in (("sound (default)", "audio_va"), ("pictures (cross-modal)", "video_va")):
        same_object = same_shape = 0
        chance_object = chance_shape = 0.0
        for video in videos:
            q = searcher.audio_terms((root / "videos" / video).read_bytes(), 0.0, searcher.settings["window"])[0]
            top = first_other(searcher.search([Term(q.vector, space, 1.0)], k=10), video)
            colour, shape = labels[video]
            got = labels[Path(top["video"]).name]
            same_object += got == (colour, shape)
            same_shape += got[1] == shape
            others = [labels[v] for v in videos if v != video]
            chance_object += sum(o == (colour, shape) for o in others) / len(others)
            chance_shape += sum(o[1] == shape for o in others) / len(others)
        n = len(videos)
        audio[name] = {"queries": n, "same_object": same_object / n, "chance_object": chance_object / n,
                       "same_shape": same_shape / n, "chance_shape": chance_shape / n}
    result = {"model": args.model, "index": args.index, "videos": counts["videos"], "windows": counts["windows"],
              "window_s": searcher.settings["window"], "text": text, "audio": audio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"index: {counts['videos']} videos, {counts['windows']} windows of {searcher.settings['window']} s")
    print(f"text 'a <colour> <shape>' ({text['queries']} queries): first result matches {text['top1']:.3f} "
          f"(chance {text['chance']:.3f}, {text['top1_over_chance']:.1f}x); precision@5 {text['precision_at_5']:.3f}")
    for name, a in audio.items():
        print(f"audio query against the windows' {name} ({a['queries']} queries): first other video is the same "
              f"object {a['same_object']:.3f} (chance {a['chance_object']:.3f}), same shape {a['same_shape']:.3f} "
              f"(chance {a['chance_shape']:.3f})")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
