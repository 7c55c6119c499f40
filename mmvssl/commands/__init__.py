"""Subcommand groups of the `mmvssl` CLI, one module each. A module exposes
`register(subparsers)`, adding its parsers with `set_defaults(func=...)`; handlers are thin and
import the library lazily so `mmvssl --help` stays fast."""

from . import data, evaluate, models, narrate, shards, train

GROUPS = [data, shards, train, evaluate, narrate, models]
