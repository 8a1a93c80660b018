"""Front doors placed inside the workers: a KServe v2 front door in each worker process, as a worker plugin.

A front door in a process of its own hands every request to the worker of the operator over a comm and takes the
answer back; one inside a worker calls the operators of that worker in-process and the others over lanes or request
streams, as the operators on that worker do (what that saves: benchmarks/README.md). Such front doors belong to the
cluster, not to the command that placed them: they serve a detached deployment, come up on workers that join or
that their nanny restarted, and go with the plugin.
"""

from __future__ import annotations

from typing import Any

from distributed.comm import get_address_host
from distributed.diagnostics.plugin import WorkerPlugin

from tdask.errors import TdaskError
from tdask.frontdoor.server import FrontDoor


class WorkerFrontDoors(WorkerPlugin):
    """A front door in every worker process, on ``host`` (default: the worker's own) and the given ports (0: a free
    one each, which is what several workers of one host need). Needs tdask on the workers
    (:class:`~tdask.worker.plugin.TdaskWorkerPlugin`, which :class:`tdask.Deployment` registers).

    >>> await client.register_plugin(TdaskWorkerPlugin())  # doctest: +SKIP
    >>> await client.register_plugin(WorkerFrontDoors())  # doctest: +SKIP
    >>> await client.run(WorkerFrontDoors.addresses)  # doctest: +SKIP
    """

    name = "tdask-frontdoor"
    idempotent = True

    def __init__(self, host: str | None = None, http_port: int = 0, grpc_port: int = 0) -> None:
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.door: FrontDoor | None = None

    async def setup(self, worker: Any) -> None:
        extension = worker.extensions.get("tdask")
        if extension is None:
            raise TdaskError(f"worker {worker.address} has no tdask (register TdaskWorkerPlugin first)")

        async def set_metadata(keys: list[str], value: Any) -> None:
            await worker.scheduler.set_metadata(keys=keys, value=value)

        door = FrontDoor(extension.session, host=self.host or get_address_host(worker.address),
                         http_port=self.http_port, grpc_port=self.grpc_port, set_metadata=set_metadata)
        await door.start()
        self.door = door

    async def teardown(self, worker: Any) -> None:
        if self.door is not None:
            door, self.door = self.door, None
            await door.close()

    @staticmethod
    def addresses(dask_worker: Any) -> dict[str, str] | None:
        """For ``client.run``: where the front door of ``dask_worker`` listens (None: it has none)."""
        plugin = dask_worker.plugins.get(WorkerFrontDoors.name)
        door = getattr(plugin, "door", None)
        return None if door is None else {"http": door.http_url, "grpc": door.grpc_address}
