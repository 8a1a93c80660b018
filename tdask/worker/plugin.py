"""The Dask way into a worker: a plugin that installs tdask on every worker of the cluster, once."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from tdask.worker.extension import WorkerExtension


class TdaskWorkerPlugin(WorkerPlugin):
    """Installs :class:`~tdask.worker.extension.WorkerExtension` as ``worker.extensions["tdask"]``.

    Registered by :class:`tdask.Deployment` (idempotent: registering it again changes nothing), so every
    worker, also one that joins later or that its nanny restarted, can host replicas. Removing the plugin
    stops what tdask runs on the worker.

    >>> await client.register_plugin(TdaskWorkerPlugin())  # doctest: +SKIP
    """

    name = "tdask"
    idempotent = True

    async def setup(self, worker: Any) -> None:
        if "tdask" not in worker.extensions:
            extension = worker.extensions["tdask"] = WorkerExtension(worker)
            await extension.publish()

    async def teardown(self, worker: Any) -> None:
        extension = worker.extensions.pop("tdask", None)
        if extension is not None:
            await extension.close()
