"""``python -m deploy``: the design's entry point; the command itself is :mod:`tdask.cli.deploy`."""

import sys

from tdask.cli.deploy import main

if __name__ == "__main__":
    sys.exit(main())
