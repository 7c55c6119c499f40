"""`mmvssl` command line. Subcommands are thin: they parse arguments and call the library.

User errors (a bad argument, a missing file, an unknown config key) end with one line on
stderr naming the problem and exit code 2; a traceback means a bug in mmvssl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import MmvsslError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _cmd_synth(args) -> None:
    from .data.synth import make_synthetic_dataset
    summary = make_synthetic_dataset(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val)
    print(json.dumps(summary, indent=2, default=str))


def _cmd_shards_build(args) -> None:
    from .data.shards import build_shards
    report = build_shards(args.videos_dir, args.out, captions=args.captions,
                          samples_per_shard=args.samples_per_shard, progress=True)
    print(f"accepted {report['num_accepted']}, rejected {report['num_rejected']} "
          f"-> {args.out} (details in {os.path.join(args.out, 'build_report.json')})")
    for item in report["rejected"][:10]:
        print(f"  rejected {item['source']}: {item['reason']}")


def _cmd_pretrain(args) -> None:
    from .config import load_config
    from .train.engine import pretrain
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.shards:
        raise MmvsslError("data.shards is not set (give it in the config or as data.shards=DIR)")
    pretrain(cfg)


def _cmd_eval_retrieval(args) -> None:
    from .evaluation.retrieval import format_table, run_retrieval
    report = run_retrieval(args.model, args.data, args.out, batch_size=args.batch_size,
                           num_workers=args.num_workers)
    print(format_table(report))
    print(f"report: {os.path.join(args.out, 'report.json')}")


def _cmd_models(args) -> None:
    from .models.presets import list_presets, load_preset
    for name in list_presets():
        print(f"{name:<24}{load_preset(name).get('description', '')}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmvssl", description="Multimodal self-supervised learning from video.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True, parser_class=_Parser)
    s = data.add_parser("synth", help="write the procedural demo dataset (videos + sounds + captions)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-train", type=int, default=384)
    s.add_argument("--num-val", type=int, default=40)
    s.set_defaults(func=_cmd_synth)

    shards = sub.add_parser("shards", help="webdataset shards").add_subparsers(dest="action", required=True,
                                                                              parser_class=_Parser)
    b = shards.add_parser("build", help="videos + captions.jsonl/csv -> tar shards, sizes.json, build_report.json")
    b.add_argument("videos_dir")
    b.add_argument("--captions", default=None, help="captions.jsonl or .csv (default: every video in the folder)")
    b.add_argument("--out", required=True)
    b.add_argument("--samples-per-shard", type=int, default=256)
    b.set_defaults(func=_cmd_shards_build)

    t = sub.add_parser("pretrain", help="train a model from a config YAML")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200")
    t.set_defaults(func=_cmd_pretrain)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="action", required=True,
                                                                       parser_class=_Parser)
    r = ev.add_parser("retrieval", help="zero-shot retrieval between modalities (t2v, v2t, a2v, v2a)")
    r.add_argument("model", help="a model folder (config.json + model.safetensors)")
    r.add_argument("--data", required=True, help="shards: a folder, brace pattern or glob")
    r.add_argument("--out", required=True)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--num-workers", type=int, default=0)
    r.set_defaults(func=_cmd_eval_retrieval)

    m = sub.add_parser("models", help="list the model presets")
    m.set_defaults(func=_cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MmvsslError as e:
        print(f"mmvssl: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"mmvssl: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmvssl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
