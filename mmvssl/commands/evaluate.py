"""`mmvssl eval ...`: evaluate a model."""

import os


def _retrieval(args) -> None:
    from ..evaluation.retrieval import format_table, run_retrieval
    report = run_retrieval(args.model, args.data, args.out, batch_size=args.batch_size, num_workers=args.num_workers)
    print(format_table(report))
    print(f"report: {os.path.join(args.out, 'report.json')}")


def register(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="action", required=True)
    r = ev.add_parser("retrieval", help="zero-shot retrieval between modalities (t2v, v2t, a2v, v2a)")
    r.add_argument("model", help="a model folder (config.json + model.safetensors)")
    r.add_argument("--data", required=True, help="shards: a folder, brace pattern or glob")
    r.add_argument("--out", required=True)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--num-workers", type=int, default=0)
    r.set_defaults(func=_retrieval)
