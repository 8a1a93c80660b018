"""A caller's session: deployed operators found by name, and one request stream per worker it calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from distributed import Client
from distributed.comm import CommClosedError

from tdask.comm import protocol
from tdask.comm.stream import StreamPool
from tdask.errors import from_wire
from tdask.operator import ResponseSink
from tdask.registry import ROOT, operator_key, pick_version, token_key
from tdask.session.remote_operator import RemoteOperator
from tdask.shm.lending import Landing, caller_landing


class WorkerSide(Protocol):
    """What a session on a worker gets from its worker (:class:`tdask.worker.extension.WorkerExtension`): the
    replicas in its own process, called without a comm, and lanes to replicas' Triton servers on its host."""

    address: str

    def free_replica(self, candidates: list[str], exclude: set[str]) -> str | None:
        """The least busy of ``candidates`` running in this process with a free slot, if any."""

    def call(self, msg: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """Answer an infer message here, as the replica's worker would answer it on a stream."""

    def stream(self, msg: dict[str, Any], sink: ResponseSink) -> asyncio.Task:
        """Run a streamed request here, its responses put into ``sink``."""

    def fetch(self, keys: list[str]) -> dict[str, Any]:
        """Tensors kept in this process."""

    def release(self, keys: list[str]) -> None:
        """Kept tensors of this process no longer referenced."""

    def lane_workers(self, record: dict[str, Any]) -> set[str]:
        """The workers of an operator's replicas that may lend this process slots."""

    async def on_lane(self, replica: str, worker: str, msg: dict[str, Any], idempotent: bool) -> dict[str, Any] | None:
        """Answer an infer message on a slot ``replica`` lent this process; None when it takes no lane."""


class Session:
    """A caller's view of the deployed operators of one Dask cluster.

    Made by :func:`connect` on a client, or by a worker for the operators it hosts (``local``: what that
    worker offers its own calls); both speak to replicas over the same request streams.

    >>> async with await tdask.connect("tcp://127.0.0.1:8786") as session:  # doctest: +SKIP
    ...     encoder = await session.operator("encoder")
    """

    def __init__(
        self,
        lookup: Callable[[list[str]], Awaitable[Any]],
        connection_args: dict[str, Any],
        client: Client | None = None,
        owns_client: bool = False,
        landing: Landing | None = None,
        local: WorkerSide | None = None,
    ) -> None:
        self.lookup = lookup
        self.pool = StreamPool(connection_args, landing, self._token)
        self.client = client
        self.local = local
        self._owns_client = owns_client
        self._operators: dict[tuple[str, int | None], RemoteOperator] = {}
        self._loop = asyncio.get_running_loop()

    async def _token(self, worker: str) -> str | None:
        """The request-stream token ``worker`` published in the scheduler's metadata."""
        return await self.lookup(token_key(worker))

    async def operator(self, name: str, version: int | None = None) -> RemoteOperator:
        """The handle to ``name`` at ``version`` (latest when ``None``)."""
        cached = self._operators.get((name, version))
        if cached is not None:
            return cached
        versions = await self.lookup(operator_key(name))
        known = list((await self.lookup(ROOT)) or {}) if not versions else []
        version_found, record = pick_version(name, versions, version, known)
        op = RemoteOperator(self, name, version_found, record)
        self._operators[(name, version)] = op
        return op

    async def operators(self) -> dict[str, Any]:
        """Every deployed operator's record, by name and version."""
        return (await self.lookup(ROOT)) or {}

    async def fetch(self, worker: str, keys: list[str]) -> dict[str, Any]:
        """Tensors kept on ``worker`` (outputs of requests sent with ``keep``), by key, on its request stream."""
        if self.local is not None and worker == self.local.address:
            return self.local.fetch(keys)
        reply = await self.pool.get(worker).call({"op": protocol.FETCH, "keys": keys})
        if "error" in reply:
            raise from_wire(reply["error"])
        return reply["tensors"]

    def release_threadsafe(self, worker: str, keys: list[str]) -> None:
        """Kept tensors no longer referenced here (called from any thread, by an answer's finalizer)."""
        try:
            if self.local is not None and worker == self.local.address:  # no stream to this worker exists
                self._loop.call_soon_threadsafe(self.local.release, keys)
            else:
                self._loop.call_soon_threadsafe(self.pool.get(worker).send, {"op": protocol.RELEASE, "keys": keys})
        except RuntimeError:  # loop closed: the worker's TTL cleans up
            pass

    async def close(self) -> None:
        await self.pool.close()
        if self._owns_client and self.client is not None:
            await self.client.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(address: str | Client | None = None, *, security: Any = None,
                  timeout: float | None = None) -> Session:
    """Open a :class:`Session` on the cluster at ``address`` (or on an async ``Client``); ``timeout``: seconds to
    reach the scheduler (default Dask's ``distributed.comm.timeouts.connect``)."""
    if isinstance(address, Client):
        client, owns = address, False
    else:
        kwargs = {"timeout": timeout} if timeout is not None else {}
        client = await Client(address, asynchronous=True, direct_to_workers=True, security=security, **kwargs)
        owns = True

    async def lookup(keys: list[str]) -> Any:
        if client.status in ("closing", "closed"):  # Dask's closed client fails with an AttributeError
            raise CommClosedError(f"the session's client is closed (its scheduler {address} is gone?)")
        return await client.get_metadata(keys, default=None)

    return Session(lookup, dict(client.connection_args), client=client, owns_client=owns, landing=caller_landing)
