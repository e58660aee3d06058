"""``python -m workloads.wsfuzz``: the working-set file reader's fuzzer (``make fuzz``);
the fuzzer itself is :mod:`workloads._wsfuzz`."""

from __future__ import annotations

import sys

from ._wsfuzz import main

if __name__ == "__main__":
    sys.exit(main())
