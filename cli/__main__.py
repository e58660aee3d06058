"""``python -m cli ...`` is ``pageload ...``."""

import sys

from . import main

sys.exit(main())
