"""`mmvssl pretrain CONFIG [key=value ...]`."""

from ..errors import MmvsslError


def _pretrain(args) -> None:
    from ..config import load_config
    from ..train.engine import pretrain
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.shards:
        raise MmvsslError("data.shards is not set (give it in the config or as data.shards=DIR)")
    pretrain(cfg)


def register(sub) -> None:
    t = sub.add_parser("pretrain", help="train a model from a config YAML")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=200")
    t.set_defaults(func=_pretrain)
