"""The ``pageload`` console script.

Each sub-command lives in its own ``loader/*_cmd.py`` module exposing
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command -> the module providing it, in the order ``--help`` lists them
COMMANDS = {
    "restore": "loader.restore_cmd",
    "wait": "loader.client_cmd",
    "stats": "loader.client_cmd",
    "checkpoint": "loader.checkpoint_cmd",
    "trace": "loader.trace_cmd",
    "loadgen": "loader.loadgen_cmd",
    "bench": "loader.bench_cmd",
    "demo": "loader.demo_cmd",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` known, only its module is imported (a daemon's
    start-up time counts: ``restore`` should not import the benchmark)."""
    parser = argparse.ArgumentParser(
        prog="pageload",
        description="Background page loader for snapshot restore: the application resumes at once, "
        "faulting clients are served first, the rest of the image loads behind them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(first).parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
