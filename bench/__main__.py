"""``python -m bench``: the benchmark suite's summary command (see bench/run.py)."""

import sys

from .run import main

sys.exit(main())
