"""`mmvssl shards ...`: build webdataset shards."""

import os


def _build(args) -> None:
    from ..data.shards import build_shards
    report = build_shards(args.videos_dir, args.out, captions=args.captions,
                          samples_per_shard=args.samples_per_shard, progress=True)
    print(f"accepted {report['num_accepted']}, rejected {report['num_rejected']} "
          f"-> {args.out} (details in {os.path.join(args.out, 'build_report.json')})")
    for item in report["rejected"][:10]:
        print(f"  rejected {item['source']}: {item['reason']}")


def register(sub) -> None:
    shards = sub.add_parser("shards", help="webdataset shards").add_subparsers(dest="action", required=True)
    b = shards.add_parser("build", help="videos + captions.jsonl/csv -> tar shards, sizes.json, build_report.json")
    b.add_argument("videos_dir")
    b.add_argument("--captions", default=None, help="captions.jsonl or .csv (default: every video in the folder)")
    b.add_argument("--out", required=True)
    b.add_argument("--samples-per-shard", type=int, default=256)
    b.set_defaults(func=_build)
