"""The ``pageload`` console script.

Each sub-command lives in its own ``cli/_<command>.py`` module exposing
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._args import one_line_errors

#: sub-command -> the module providing it, in the order ``--help`` lists them
COMMANDS = {
    "restore": "cli._restore",
    "wait": "cli._client",
    "stats": "cli._client",
    "mark": "cli._client",
    "checkpoint": "cli._checkpoint",
    "cache": "cli._cache",
    "store": "cli._store",
    "working-set": "cli._workingset",
    "trace": "cli._trace",
    "loadgen": "cli._loadgen",
    "bench": "cli._bench",
    "demo": "cli._demo",
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
        importlib.import_module(name).register(sub)
    _one_line_everywhere(parser)  # usage errors are one line and exit 2, in every command
    return parser


def _one_line_everywhere(parser: argparse.ArgumentParser) -> None:
    """``parser`` and all its sub-parsers report usage errors as one line (unknown
    flags are the top parser's to report, the rest each sub-parser's)."""
    one_line_errors(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _one_line_everywhere(child)


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
