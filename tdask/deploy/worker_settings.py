"""A worker plugin that gives every worker a deployment's tdask settings and a log file of its own."""

from __future__ import annotations

import logging
import os
from typing import Any

import dask.config
from distributed.diagnostics.plugin import WorkerPlugin

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def log_file_name(worker_name: Any) -> str:
    safe = str(worker_name).replace("/", "_").replace(":", "_")
    return f"worker-{safe}.log"


class WorkerSettings(WorkerPlugin):
    """Applies ``tdask.*`` settings on workers the user started, and writes ``--log-dir`` logs.

    Workers of an embedded cluster get the same settings from their nanny; workers
    started with ``dask worker`` get them here, so both behave alike.
    """

    name = "tdask-settings"

    def __init__(self, settings: dict[str, Any], log_level: str = "INFO") -> None:
        # dotted keys, e.g. {"tdask.log-dir": "logs"}: dask.config.set would replace a nested dict whole
        self.settings = settings
        self.log_level = log_level
        self._handler: logging.Handler | None = None

    def setup(self, worker: Any) -> None:
        dask.config.set(self.settings)
        log_dir = self.settings.get("tdask.log-dir")
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            handler = logging.FileHandler(os.path.join(log_dir, log_file_name(worker.name)))
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            handler.setLevel(self.log_level)
            for name in ("distributed", "tdask"):
                logger = logging.getLogger(name)
                logger.addHandler(handler)
                if name == "tdask":
                    logger.setLevel(self.log_level)
            self._handler = handler

    def teardown(self, worker: Any) -> None:
        if self._handler is not None:
            for name in ("distributed", "tdask"):
                logging.getLogger(name).removeHandler(self._handler)
            self._handler.close()
