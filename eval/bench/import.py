"""Clips/s of `mmvssl extract` with an imported model against the same model called through
transformers directly on the same decoded clips (docs/models.md).

    python eval/bench/import.py [--source SOURCE] [--videos 16] [--workers 0] [--batch 8]

Without --source it builds the tests' tiny X-CLIP (random weights, nothing downloaded). Both sides
run the same clips, once decoded, in batches of --batch on the CPU: the direct side times only the
source's get_video_features on pixel values made as its processor would (decoding excluded), the
extract side the whole command (decode + convert + the same forward). The ratio extract / direct is
printed; above 1 would need the loader's decoding hidden behind the model (--workers). With --checks
it also imports every tiny source of tests/test_models_import.py with --check and prints check.json.
Run from a checkout (it imports tests/ for the tiny sources).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", help="a transformers X-CLIP folder or hub name (default: the tests' tiny X-CLIP)")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--checks", action="store_true", help="import every tiny source with --check and print the numbers")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from mmvssl.data.shards import build_shards
    from mmvssl.data.synth import make_synthetic_dataset
    from mmvssl.evaluation.features import DecodeViews, ExtractOptions, extract_features, eval_spec
    from mmvssl.models.imported import import_source, load_imported, read_folder_config
    from mmvssl.models.imported.build import load_source
    from mmvssl.models.imported.check import _source_pixels, check_import
    from tests.test_models_import import build_open_clip, build_source

    root = Path(tempfile.mkdtemp(prefix="bench-import-"))
    make_synthetic_dataset(root / "data", seed=0, num_train=args.videos, num_val=1, seconds=3.0)
    build_shards(root / "data" / "train", root / "shards", captions=root / "data" / "train" / "captions.jsonl",
                 samples_per_shard=8)
    source = args.source or build_source("xclip", root / "src-xclip")
    import_source(source).save_pretrained(root / "model")
    model = load_imported(root / "model", read_folder_config(root / "model"))
    options = ExtractOptions(batch_size=args.batch, num_workers=args.workers)
    spec = eval_spec(model)

    t = time.perf_counter()
    feats = extract_features(model, str(root / "shards"), options)
    extract_s = time.perf_counter() - t
    n = len(feats["keys"])

    # the same clips, decoded once, as uint8 frames (B, T, S, S, 3) -> the source's own call
    import webdataset as wds
    from mmvssl.data.loader import VIDEO_MEAN, VIDEO_STD
    decode = DecodeViews(spec, ExtractOptions())
    clips = [decode.decode(raw)["video"][0] for raw in wds.WebDataset(sorted(map(str, (root / "shards").glob("*.tar"))),
                                                                        shardshuffle=False)]
    frames = [((c * VIDEO_STD + VIDEO_MEAN) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
              for c in clips]  # (T, S, S, 3)
    src = load_source(source)
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(frames), args.batch):
            pixels = _source_pixels(torch.stack(frames[i:i + args.batch]), model.config["preprocess"])
            src.get_video_features(pixel_values=pixels)
    direct_s = time.perf_counter() - t

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"model: {model.name} ({sum(p.numel() for p in model.parameters()):,} parameters), {n} clips of "
          f"{spec.num_frames} frames at {spec.size} px, batch {args.batch}, workers {args.workers}")
    print(f"extract (decode + model): {n / extract_s:.1f} clips/s; transformers direct (model only, decoded clips): "
          f"{len(frames) / direct_s:.1f} clips/s; ratio {(n / extract_s) / (len(frames) / direct_s):.2f}x")

    if args.checks:
        for kind in ("xclip", "clap", "videomae", "vjepa2", "timesformer", "vivit", "clip", "siglip", "open_clip"):
            src_path = build_open_clip(root / "src-oc") if kind == "open_clip" else (
                source if kind == "xclip" and not args.source else build_source(kind, root / f"src-{kind}"))
            out = root / f"model-{kind}"
            import_source(src_path).save_pretrained(out)
            report = check_import(load_imported(out, read_folder_config(out)), src_path, out)
            print(f"check {kind}: " + ", ".join(f"{m} {report[m]:.1e}" for m in ("video", "audio", "text")
                                                if m in report))


if __name__ == "__main__":
    main()
