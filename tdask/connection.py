"""Callers' side of the request stream: one long-lived, batched comm per worker."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any, Protocol

from distributed.comm import CommClosedError, connect, get_address_host

from tdask import config
from tdask import errors as _errors
from tdask.errors import ReplicaUnavailableError
from tdask.socket_comm import Landing, connect_socket, socket_stream_wanted
from tdask.writer import CoalescingWriter

logger = logging.getLogger(__name__)

_ids = itertools.count()


async def read_messages(comm: Any, handle: Callable[[dict[str, Any]], None]) -> None:
    """Hand every message of ``comm`` to ``handle``, one at a time (a writer's batch arrives as a list), until
    it ends (raises CommClosedError). A plain-socket stream hands small ones over from its readiness callback
    (:meth:`~tdask.socket_comm.SocketComm.serve`)."""

    def each(msgs: Any) -> None:
        if isinstance(msgs, (list, tuple)):
            for msg in msgs:
                handle(msg)
        else:
            handle(msgs)

    serve = getattr(comm, "serve", None)
    if serve is not None:
        await serve(each)
    else:
        while True:
            each(await comm.read())  # not held while the next one is awaited: its regions would stay taken


def error_from_wire(err: dict[str, Any]) -> Exception:
    cls = getattr(_errors, err.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, _errors.TdaskError)):
        cls = _errors.OperatorError
    return cls(err.get("message", "unknown error"))


class WorkerStream:
    """All calls from this process to one worker share this comm.

    Requests are written through a :class:`~tdask.writer.CoalescingWriter`, so many
    pending requests leave in one write; answers come back on the same comm, matched by
    call id. Losing the comm fails every pending call with :class:`ReplicaUnavailableError`.
    """

    def __init__(self, address: str, connection_args: dict[str, Any], landing: Landing | None = None,
                 listener: StreamListener | None = None) -> None:
        self.address = address
        self.connection_args = connection_args
        self.landing = landing  # where large frames of the answers are received (plain-socket streams only)
        self.listener = listener
        self.pending: dict[int, asyncio.Future] = {}
        self.comm: Any = None
        self.sender: CoalescingWriter | None = None
        self._reader: asyncio.Task | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()

    async def _ensure(self) -> CoalescingWriter:
        if self.sender is not None and not self.comm.closed():
            return self.sender
        async with self._connecting:
            if self.sender is not None and not self.comm.closed():
                return self.sender
            try:
                comm = await self._open()
            except (OSError, CommClosedError) as e:  # TimeoutError is an OSError
                error = ReplicaUnavailableError(f"cannot connect to worker {self.address}: {e}")
                error.retryable = True  # nothing was sent: safe to try another replica
                raise error from e
            sender = CoalescingWriter(comm)
            self.comm, self.sender = comm, sender
            self._reader = asyncio.ensure_future(self._read(comm))
            return sender

    async def _open(self) -> Any:
        """A request stream: on the worker's plain socket where it offers one, else on a Dask comm."""
        timeout = config.seconds("transfer.connect-timeout")
        wanted = socket_stream_wanted(self.address)
        comm = await connect(self.address, timeout=timeout, **self.connection_args)
        try:
            if wanted:
                await comm.write({"op": "tdask_stream_socket", "reply": True})
                reply = await comm.read()
                if "port" not in reply:  # the worker failed to open it: say so, never quietly use the Dask comm
                    raise CommClosedError(f"worker {self.address} could not open its request-stream socket: "
                                          f"{reply.get('text') or reply}")
                if reply["port"] is not None:  # None: the worker takes requests on Dask comms only
                    await comm.close()
                    return await connect_socket(get_address_host(self.address), reply["port"], timeout,
                                                self.landing)
            await comm.write({"op": "tdask_stream", "reply": False})
        except BaseException:
            comm.abort()
            raise
        return comm

    async def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        sender = await self._ensure()
        call_id = next(_ids)
        msg["id"] = call_id
        fut = asyncio.get_running_loop().create_future()
        self.pending[call_id] = fut
        try:
            sender.send(msg)
        except CommClosedError as e:
            self.pending.pop(call_id, None)
            error = ReplicaUnavailableError(f"connection to worker {self.address} closed: {e}")
            error.retryable = True
            raise error from e
        try:
            return await fut
        finally:
            self.pending.pop(call_id, None)

    def send(self, msg: dict[str, Any]) -> None:
        """Fire and forget (releases); dropped when the stream is down."""
        if self.sender is not None and not self.comm.closed():
            try:
                self.sender.send(msg)
            except CommClosedError:
                pass

    async def _read(self, comm: Any) -> None:
        try:
            await read_messages(comm, self._answered)
        except (CommClosedError, OSError) as e:
            reason = e
        except Exception as e:  # pragma: no cover - keep the error visible
            logger.exception("tdask stream from %s failed", self.address)
            reason = e
        self.fail_all(ReplicaUnavailableError(
            f"lost connection to worker {self.address} ({reason}); the request may or may not have run"))
        if self.listener is not None:
            self.listener.lost(self.address)

    def _answered(self, msg: dict[str, Any]) -> None:
        if "op" in msg:  # sent by the worker unasked (a replica asks a lane for its slots back)
            if self.listener is not None:
                self.listener.pushed(self.address, msg)
            return
        fut = self.pending.pop(msg.get("id"), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def fail_all(self, error: Exception) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    async def close(self) -> None:
        if self.sender is not None:
            self.send({"op": "close-stream"})
            await self.sender.flush()
            self.sender.abort()
        if self._reader is not None:
            self._reader.cancel()
        if self.comm is not None and not self.comm.closed():
            self.comm.abort()
        self.fail_all(ReplicaUnavailableError(f"stream to {self.address} closed"))


class StreamListener(Protocol):
    """Told what the workers send unasked, and when a stream to one is lost (:class:`tdask.lanes.Lanes`)."""

    def pushed(self, address: str, msg: dict[str, Any]) -> None: ...

    def lost(self, address: str) -> None: ...


class StreamPool:
    """One :class:`WorkerStream` per worker address, per caller."""

    def __init__(self, connection_args: dict[str, Any], landing: Landing | None = None) -> None:
        self.connection_args = connection_args
        self.landing = landing
        self.listener: StreamListener | None = None
        self.streams: dict[str, WorkerStream] = {}

    def get(self, address: str) -> WorkerStream:
        stream = self.streams.get(address)
        if stream is None:
            stream = self.streams[address] = WorkerStream(address, self.connection_args, self.landing,
                                                          self.listener)
        return stream

    async def close(self) -> None:
        streams, self.streams = self.streams, {}
        await asyncio.gather(*(s.close() for s in streams.values()), return_exceptions=True)
