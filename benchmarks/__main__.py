"""``python -m benchmarks``: the side-by-side pipeline benchmark (direct Triton vs tdask)."""

import sys

from benchmarks.pipeline import main

sys.exit(main())
