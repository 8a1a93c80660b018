"""Worker preload of the embedded cluster: Ctrl-C belongs to ``python -m deploy``.

A terminal sends SIGINT to the whole foreground process group, worker processes
included. Workers ignore it, so deploy can drain requests and stop them in order.
"""

from __future__ import annotations

import signal
from typing import Any


def dask_setup(worker: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
