"""``python -m workloads.fuzz``: the protocol fuzzer against a fresh daemon process
(``make fuzz``); the fuzzer itself is :mod:`workloads._fuzz`."""

from __future__ import annotations

import sys

from ._fuzz import main

if __name__ == "__main__":
    sys.exit(main())
