"""`mmvssl data ...`: datasets."""

import json


def _synth(args) -> None:
    from ..data.synth import make_synthetic_dataset
    summary = make_synthetic_dataset(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val)
    print(json.dumps(summary, indent=2, default=str))


def register(sub) -> None:
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    s = data.add_parser("synth", help="write the procedural demo dataset (videos + sounds + captions)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-train", type=int, default=384)
    s.add_argument("--num-val", type=int, default=120)
    s.set_defaults(func=_synth)
