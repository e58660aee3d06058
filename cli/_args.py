"""Argument types and options shared by the sub-commands."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from loader import parse_size
from loader._startup import UID_MAX

_SHORT = ((1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K"))


def size_arg(text: str) -> int:
    """argparse ``type=`` for sizes with K/M/G/T suffixes (powers of 1024)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def short_size(n: int) -> str:
    """4096 -> '4K', 3 << 30 -> '3G', 1000 -> '1000': how a size is written on the command line."""
    for unit, suffix in _SHORT:
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def add_size(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    *,
    default: int | None,
    help: str,
    metavar: str = "SIZE",
) -> None:
    """A size option (``4K``, ``1G``, ``0x1000``); its help ends with the default,
    written as it would be typed."""
    if default is not None and "(default" not in help:
        help = f"{help} (default {short_size(default)})"
    parser.add_argument(flag, type=size_arg, default=default, metavar=metavar, help=help)


def add_s3_endpoint(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--s3-endpoint``: where an ``s3://`` URL's requests go."""
    parser.add_argument(
        "--s3-endpoint", metavar="URL", default=None,
        help="S3 endpoint, scheme://host[:port] (MinIO, Ceph, SeaweedFS...; plain http only when given as "
        "http://); default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS's for $AWS_REGION",
    )


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def uid_arg(text: str) -> int:
    """argparse ``type=`` for a user id: 0 to 2**32 - 2 ((uid_t)-1 is no user)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a user id: {text!r}") from None
    if not 0 <= value <= UID_MAX:
        raise argparse.ArgumentTypeError(f"not a user id (0 to {UID_MAX}): {text}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=`` for durations that must be a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report a usage error as one line on stderr (exit 2), not
    the usage block: a daemon's start-up failure is one line."""
    prog = parser.prog

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{prog}: {' '.join(message.split())} (see {prog} --help)\n")

    setattr(parser, "error", error)  # noqa: B010 (an instance override; mypy rejects assigning a method)
    return parser
