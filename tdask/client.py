"""``python -m tdask.client``: the load generator's entry point; the command itself is :mod:`tdask.cli.client`."""

import sys

from tdask.cli.client import main

if __name__ == "__main__":
    sys.exit(main())
