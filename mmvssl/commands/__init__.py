"""Subcommand groups of the `mmvssl` CLI, one module each. A module exposes
`register(subparsers)`, adding its parsers with `set_defaults(func=...)`; handlers are thin and
import the library lazily so `mmvssl --help` stays fast."""

from . import data, datasets, evaluate, finetune, models, narrate, search, shards, train, views

GROUPS = [data, datasets, shards, train, finetune, evaluate, narrate, models, search, views]
