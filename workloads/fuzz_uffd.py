"""``python -m workloads.fuzz_uffd``: the uffd handshake fuzzer against a fresh daemon
process (``make fuzz``); the fuzzer itself is :mod:`workloads._fuzz_uffd`."""

from __future__ import annotations

import sys

from ._fuzz_uffd import main

if __name__ == "__main__":
    sys.exit(main())
