"""``tdask-triton-env``: make Triton's environment now (instead of at a worker's first Triton model) and print
where it is."""

from __future__ import annotations

import sys

from tdask.errors import TritonServerError
from tdask.triton.environment import ensure


def main() -> int:
    try:
        environment = ensure()
    except TritonServerError as e:
        print(f"tdask: {e}", file=sys.stderr)
        return 1
    versions = environment.versions()
    print(f"{environment.path} (Python {versions['python']}, NumPy {versions['numpy']}, "
          f"Triton from nvidia-pytriton {versions['pytriton']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
