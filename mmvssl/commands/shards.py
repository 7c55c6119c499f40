"""`mmvssl shards ...`: build, inspect and verify webdataset shards."""

import json
import os


def _build(args) -> None:
    from ..data.shards import build_shards
    report = build_shards(args.videos_dir, args.out, captions=args.captions,
                          samples_per_shard=args.samples_per_shard, progress=True, workers=args.workers,
                          short_side=args.short_side, fps=args.fps, clip_seconds=args.max_seconds,
                          overwrite=args.overwrite, max_pixels=args.max_pixels, max_seconds=args.max_duration,
                          check=args.check)
    total = report["num_accepted"] + report["num_rejected"]
    print(f"inputs {total}: accepted {report['num_accepted']}, rejected {report['num_rejected']} "
          f"-> {args.out} (details in {os.path.join(args.out, 'build_report.json')})")
    for item in report["rejected"][:10]:
        where = f" (line {item['line']})" if item.get("line") else ""
        print(f"  rejected {item['source']}{where}: {item['reason']}")


def _inspect(args) -> None:
    from ..data.audit import contact_sheet, inspect_shards
    print(json.dumps(inspect_shards(args.shards), indent=2))
    if args.sheet:
        rows = contact_sheet(args.shards, args.sheet)
        print(f"contact sheet with {rows} samples -> {args.sheet}")


def _verify(args) -> None:
    from ..data.audit import verify_shards
    from ..errors import MmvsslError
    result = verify_shards(args.shards)
    print(f"checked {result['checked']} samples ({result['without_video']} without video): "
          f"{len(result['failed'])} failed")
    for item in result["failed"]:
        print(f"  {item['shard']} {item['key']}: {item['reason']}")
    if result["failed"]:
        raise MmvsslError(f"{len(result['failed'])} samples failed to decode")


def register(sub) -> None:
    shards = sub.add_parser("shards", help="webdataset shards").add_subparsers(dest="action", required=True)
    b = shards.add_parser("build", help="videos + captions.jsonl/csv -> tar shards, sizes.json, build_report.json")
    b.add_argument("videos_dir")
    b.add_argument("--captions", default=None, help="captions.jsonl or .csv (default: every video in the folder)")
    b.add_argument("--out", required=True)
    b.add_argument("--samples-per-shard", type=int, default=256)
    b.add_argument("--workers", type=int, default=1, help="processes probing / re-encoding inputs")
    b.add_argument("--short-side", type=int, default=None, help="re-encode: shorter side in pixels")
    b.add_argument("--fps", type=float, default=None, help="re-encode: constant frame rate")
    b.add_argument("--max-seconds", type=float, default=None,
                   help="re-encode: cut longer videos into consecutive clips of this length (narrations re-timed)")
    b.add_argument("--max-pixels", type=int, default=4096 * 2160, help="reject larger frames (from the header)")
    b.add_argument("--max-duration", type=float, default=4 * 3600.0, help="reject longer videos (seconds)")
    b.add_argument("--check", choices=["full", "first-frame"], default="full",
                   help="full: decode every video packet to catch truncated files")
    b.add_argument("--overwrite", action="store_true", help="rebuild instead of resuming an earlier build")
    b.set_defaults(func=_build)
    i = shards.add_parser("inspect", help="counts, hours, distributions; --sheet writes a contact sheet PNG")
    i.add_argument("shards")
    i.add_argument("--sheet", default=None)
    i.set_defaults(func=_inspect)
    v = shards.add_parser("verify", help="decode every sample and list the failures")
    v.add_argument("shards")
    v.set_defaults(func=_verify)
