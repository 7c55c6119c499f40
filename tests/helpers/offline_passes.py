"""Launched by tests/test_offline_passes.py as `torchrun --nproc_per_node 2 ... COMMANDS.json`:
every process runs each mmvssl command line of the file in turn through the CLI's own entry point
(what `-m mmvssl.cli` runs), so one launch covers several passes; exits with the first failure's status."""

import json
import sys

from mmvssl.cli import main

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        commands = json.load(f)
    for argv in commands:
        status = main(argv)
        if status:
            sys.exit(status)
