"""Sizes with K/M/G/T suffixes (powers of 1024), and their display."""

from __future__ import annotations

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"4K"`` -> 4096, ``"1.5G"`` -> 1610612736, ``"0x1000"`` -> 4096.  ValueError if bad."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    if s.startswith("0X"):
        return int(s, 16)
    unit = s[-1:] if s[-1:] in _SUFFIX and s[-1:] else ""
    number = s[: len(s) - len(unit)] if unit else s
    try:
        value = float(number) * _SUFFIX[unit] if "." in number else int(number) * _SUFFIX[unit]
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use a number with an optional K/M/G/T suffix)") from None
    if value < 0:
        raise ValueError(f"a size cannot be negative: {text!r}")
    return int(value)


def human(n: float) -> str:
    """4096 -> '4.0 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
