"""``python -m benchmarks``: run fastppo's micro-benchmarks as one suite (see benchmarks/suite.py)."""

import sys

from benchmarks.suite import main

sys.exit(main())
