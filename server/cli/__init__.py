"""The `taskserve` command line.

Subcommands: `serve` (the HTTP API over the store, with an embedded training worker), `worker`
(training jobs), `train` / `eval` (multi-task training and evaluation on the real data), `data fetch`,
`store export|import` (store seeds such as the demo store), `tasks` / `jobs` / `predict` (a running
server, over the client; PEFT checkpoints in and out), `prepare` (the offline models), `bench` (the
benchmark harness of a source checkout). Common options: --backbone, --device, --dtype, --store (or
the TASKSERVE_* variables). Method choices come from the method registry (plugins named in
TASKSERVE_PLUGINS included). Long work shows tqdm progress bars.
"""

from __future__ import annotations

import argparse
import sys

from server.cli import experiments, local, remote
from server.errors import TaskservError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskserve", description="Multi-task inference server over one frozen backbone.")
    sub = parser.add_subparsers(dest="command", required=True)
    remote.add_parsers(sub)
    local.add_parsers(sub)
    experiments.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from server.methods import load_plugins
    from server.settings import Settings

    load_plugins(Settings().plugin_modules)  # plugin methods are valid choices
    parser = build_parser()
    args = parser.parse_args(argv)
    remote.check(parser, args)
    try:
        return args.func(args)
    except TaskservError as exc:
        print(f"error ({exc.type}): {exc.message}", file=sys.stderr)
        return 1
