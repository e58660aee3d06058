"""The ``pageload`` console script.

Each sub-command lives in its own ``loader/*_cmd.py`` module exposing
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: modules providing sub-commands, in the order ``--help`` lists them
COMMAND_MODULES = [
    "loader.restore_cmd",  # restore
    "loader.client_cmd",  # wait, stats
    "loader.checkpoint_cmd",  # checkpoint create|inspect|verify
    "loader.trace_cmd",  # trace gen|convert|show
    "loader.loadgen_cmd",  # loadgen
    "loader.bench_cmd",  # bench
    "loader.demo_cmd",  # demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pageload",
        description="Background page loader for snapshot restore: the application resumes at once, "
        "faulting clients are served first, the rest of the image loads behind them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
