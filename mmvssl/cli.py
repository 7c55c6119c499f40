"""`mmvssl` command line: the subcommand groups live in mmvssl/commands/, one module each.

User errors (a bad argument, a missing file, an unknown config key) end with one line on
stderr naming the problem and exit code 2; a traceback means a bug in mmvssl.
"""

from __future__ import annotations

import argparse
import sys

from .commands import GROUPS
from .errors import MmvsslError, one_line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmvssl", description="Multimodal self-supervised learning from video.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MmvsslError as e:
        print(f"mmvssl: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        where = f": {e.filename}" if e.filename else ""  # none when re-raised from a loader worker
        print(f"mmvssl: error: {e.strerror or one_line(e)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmvssl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
