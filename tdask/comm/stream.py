"""Callers' side of the request stream: one long-lived, batched comm per worker, opened with the hello."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from distributed.comm import CommClosedError, connect, get_address_host
from distributed.core import clean_exception

from tdask import config
from tdask.comm import protocol, tcp
from tdask.comm.writer import CoalescingWriter
from tdask.compat import TimeoutErrors
from tdask.errors import ProtocolError, ReplicaUnavailableError, from_wire
from tdask.operator import ResponseChannel
from tdask.shm.lending import Landing

logger = logging.getLogger(__name__)

_ids = itertools.count()


async def read_messages(comm: Any, handle: Callable[[dict[str, Any]], None]) -> None:
    """Hand every message of ``comm`` to ``handle``, one at a time (a writer's batch arrives as a list), until
    it ends (raises CommClosedError). A tdask socket hands small ones over from its readiness callback
    (:meth:`~tdask.comm.tcp.SocketComm.serve`)."""

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


async def open_stream(comm: Any, timeout: float, token: str | None) -> None:
    """The caller's side of a new stream's hellos: its own first, with the worker's ``token``, then the worker's.
    A :class:`~tdask.errors.ProtocolError` when the worker speaks another protocol version or refuses the
    stream; lending is agreed where both ends share ``/dev/shm``."""
    socket_comm = isinstance(comm, tcp.SocketComm)
    await comm.write(protocol.hello(comm.identity() if socket_comm else b"", token=token))
    peer = protocol.check_hello(await asyncio.wait_for(comm.read(), timeout), comm.peer_address)
    if socket_comm:
        comm.agree(peer["host"])


async def accept_stream(comm: Any, timeout: float, token: str) -> None:
    """The worker's side: the caller's hello must come within ``timeout`` and carry this worker's ``token``
    (which only members of the cluster can read from the scheduler) before this host's identity is told; else a
    hello that says why, and a :class:`~tdask.errors.ProtocolError`."""
    socket_comm = isinstance(comm, tcp.SocketComm)
    try:
        peer = protocol.check_hello(await asyncio.wait_for(comm.read(), timeout), comm.peer_address)
        if not hmac.compare_digest((peer["token"] or "").encode(), token.encode()):
            raise ProtocolError(f"{comm.peer_address} opened a request stream without this worker's token")
    except ProtocolError as e:
        try:  # say why before the stream ends (best effort)
            await asyncio.wait_for(comm.write(protocol.hello(b"", error=str(e))), timeout)
        except (CommClosedError, OSError, *TimeoutErrors):
            pass
        raise
    await comm.write(protocol.hello(comm.identity() if socket_comm else b""))
    if socket_comm:
        comm.agree(peer["host"])


def _reason(reply: Any) -> Any:
    """The exception a Dask handler answered with, else the answer itself."""
    try:
        return clean_exception(**reply)[1]
    except Exception:  # noqa: BLE001 - not an error message
        return reply


class WorkerStream:
    """All calls from this process to one worker share this comm.

    Requests are written through a :class:`~tdask.writer.CoalescingWriter`, so many
    pending requests leave in one write; answers come back on the same comm, matched by
    call id. Losing the comm fails every pending call with :class:`ReplicaUnavailableError`.
    """

    def __init__(self, address: str, connection_args: dict[str, Any], landing: Landing | None = None,
                 listener: StreamListener | None = None, token: Token | None = None) -> None:
        self.address = address
        self.token = token  # the worker's token, asked of the scheduler when a stream opens
        self.connection_args = connection_args
        self.landing = landing  # where large frames of the answers are received (plain-socket streams only)
        self.listener = listener
        self.pending: dict[int, asyncio.Future] = {}
        self.receiving: dict[int, ResponseChannel] = {}  # streamed requests' responses, by call id
        self.comm: Any = None
        self.sender: CoalescingWriter | None = None
        self._reader: asyncio.Task | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()
        # a connect that failed, and until when the requests after it fail at once (a dead worker is not
        # waited for again by every request queued behind it)
        self._failed: tuple[float, Exception] | None = None

    async def _ensure(self) -> CoalescingWriter:
        if self.sender is not None and not self.comm.closed():
            return self.sender
        async with self._connecting:
            if self.sender is not None and not self.comm.closed():
                return self.sender
            now = time.monotonic()
            if self._failed is not None and now < self._failed[0]:
                raise ReplicaUnavailableError(f"cannot connect to worker {self.address}: {self._failed[1]}",
                                              retryable=True)
            try:
                comm = await self._open()
            except (OSError, CommClosedError, *TimeoutErrors) as e:  # nothing was sent
                self._failed = (time.monotonic() + config.seconds("routing.refresh-interval"), e)
                raise ReplicaUnavailableError(f"cannot connect to worker {self.address}: {e}", retryable=True) from e
            self._failed = None
            sender = CoalescingWriter(comm)
            self.comm, self.sender = comm, sender
            self._reader = asyncio.ensure_future(self._read(comm))
            return sender

    async def _open(self) -> Any:
        """A request stream: on the worker's tdask socket where it offers one, else on a Dask comm."""
        timeout = config.seconds("transfer.connect-timeout")
        token = await asyncio.wait_for(self.token(self.address), timeout) if self.token is not None else None
        comm = await connect(self.address, timeout=timeout, **self.connection_args)
        try:
            if tcp.socket_stream_wanted(self.address):
                await comm.write({"op": protocol.SOCKET_HANDLER, "reply": True})
                reply = await comm.read()
                if not isinstance(reply, dict) or "port" not in reply:  # never quietly use the Dask comm instead
                    raise CommClosedError(f"worker {self.address} could not open its request-stream socket: "
                                          f"{_reason(reply)}")
                if reply["port"] is not None:  # None: the worker takes requests on Dask comms only
                    await comm.close()
                    address = tcp.address_of(get_address_host(self.address), reply["port"])
                    comm = await connect(address, timeout=timeout, landing=self.landing)
            await comm.write({"op": protocol.STREAM_HANDLER, "reply": False})
            await open_stream(comm, timeout, token)
        except BaseException:
            comm.abort()
            raise
        return comm

    async def _send_call(self, msg: dict[str, Any], waiting: dict[int, Any], receiver: Any) -> int:
        """Send ``msg`` under a new call id, its answers awaited by ``receiver`` in ``waiting``."""
        sender = await self._ensure()
        call_id = next(_ids)
        msg["id"] = call_id
        waiting[call_id] = receiver
        try:
            sender.send(msg)
        except CommClosedError as e:  # before it was sent
            waiting.pop(call_id, None)
            raise ReplicaUnavailableError(f"connection to worker {self.address} closed: {e}", retryable=True) from e
        return call_id

    async def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        fut = asyncio.get_running_loop().create_future()
        call_id = await self._send_call(msg, self.pending, fut)
        try:
            return await fut
        finally:
            self.pending.pop(call_id, None)

    async def stream(self, msg: dict[str, Any], channel: ResponseChannel) -> int:
        """Send a streamed request whose responses go to ``channel`` as they arrive; returns its call id (what
        ``credit`` and ``cancel`` name)."""
        return await self._send_call(msg, self.receiving, channel)

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
        if fut is not None:
            if not fut.done():
                fut.set_result(msg)
            return
        channel = self.receiving.get(msg.get("id"))
        if channel is not None:
            error = msg.get("error")
            if error is not None or msg.get("final"):
                del self.receiving[msg["id"]]
            channel.push(msg.get("outputs"), bool(msg.get("final")), from_wire(error) if error is not None else None)

    def fail_all(self, error: Exception) -> None:
        receiving, self.receiving = self.receiving, {}
        for channel in receiving.values():
            channel.push(None, True, error)
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    async def close(self) -> None:
        if self.sender is not None:
            self.send({"op": protocol.CLOSE})
            await self.sender.flush()
            self.sender.abort()
        if self._reader is not None:
            self._reader.cancel()
        if self.comm is not None and not self.comm.closed():
            self.comm.abort()
        self.fail_all(ReplicaUnavailableError(f"stream to {self.address} closed"))


class StreamListener(Protocol):
    """Told what the workers send unasked, and when a stream to one is lost (:class:`tdask.worker.lanes.Lanes`)."""

    def pushed(self, address: str, msg: dict[str, Any]) -> None: ...

    def lost(self, address: str) -> None: ...


Token = Callable[[str], Awaitable["str | None"]]  # a worker's address -> its request-stream token


class StreamPool:
    """One :class:`WorkerStream` per worker address, per caller; ``token`` finds each worker's token."""

    def __init__(self, connection_args: dict[str, Any], landing: Landing | None = None,
                 token: Token | None = None) -> None:
        self.connection_args = connection_args
        self.landing = landing
        self.token = token
        self.listener: StreamListener | None = None
        self.streams: dict[str, WorkerStream] = {}

    def get(self, address: str) -> WorkerStream:
        stream = self.streams.get(address)
        if stream is None:
            stream = self.streams[address] = WorkerStream(address, self.connection_args, self.landing,
                                                          self.listener, self.token)
        return stream

    async def close(self) -> None:
        streams, self.streams = self.streams, {}
        await asyncio.gather(*(s.close() for s in streams.values()), return_exceptions=True)
