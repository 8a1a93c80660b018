"""The request stream on a plain TCP socket: a Dask comm backend (``tdask://``), without tornado.

Only the request streams of plain ``tcp://`` workers use it (``tdask.transfer.request-stream``); TLS and
UCX keep Dask's comms. It is registered with Dask like Dask's own TCP backend, so it connects, listens
and shakes hands the way every Dask comm does (:func:`distributed.comm.connect`, ``listen``), and a worker
hands the comms it accepts to its own ``handle_comm``. Messages are made and read by
``distributed.protocol.dumps`` and ``loads``, so whatever Dask can send travels exactly as on its TCP
comm. What it does differently, and what that buys, is in docs/design.md:

* it reads and writes with asyncio's own socket calls, and hands a message of small frames to its consumer
  from the socket's readiness callback (:meth:`SocketComm.serve`) and sends a small batch from the writer's
  own step (:meth:`SocketComm.try_write`), with no task per message;
* a large frame is received where the receiver says it lands (``landing``: a shared-memory region of the
  worker's Triton server, so that it is the model's input where it arrived);
* between processes that share ``/dev/shm`` (both ends say so in the stream's hello,
  :mod:`tdask.comm.protocol`), a large frame that lies in a tdask shared-memory region of the sender is
  *lent* (:mod:`tdask.shm.lending`): the wire carries the region's name, offset and size instead of its
  bytes, and the receiver acknowledges the loan once it has copied the frame, or once its mapping of it
  is gone (:mod:`tdask.shm.mappings`). A large frame that lies in no region is first copied into the
  process's frame pool (:mod:`tdask.shm.regions`) and lent from there.

Wire format of one message: frame count (u64), each frame's length (u64), the frames. A lent frame's length
word has ``LENT`` set; an acknowledgement is a control message: a count word with ``_CONTROL`` set, the
payload's length, the tokens acknowledged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from distributed.comm.addressing import parse_host_port, unparse_address, unparse_host_port
from distributed.comm.core import BaseListener, CommClosedError, Connector
from distributed.comm.core import Comm as DaskComm
from distributed.comm.registry import backends
from distributed.comm.tcp import BaseTCPBackend, set_tcp_timeout
from distributed.comm.utils import ensure_concrete_host
from distributed.protocol import dumps, loads
from distributed.protocol.utils import host_array
from distributed.utils import ensure_memoryview

from tdask import compat, config
from tdask.comm import protocol
from tdask.compat import TimeoutErrors
from tdask.errors import ConfigError
from tdask.shm import lending
from tdask.shm.lending import IN_PLACE, Landing
from tdask.shm.mappings import Borrowed, mappings
from tdask.shm.regions import frame_pool

logger = logging.getLogger(__name__)


U64 = struct.Struct("<Q")
LOAN = struct.Struct("<QQQ")  # a lent frame: token, offset, size; then the region's name
SMALL = 64 * 1024  # frames up to this size are read through one reused buffer; larger ones into their own
_MAX_PARTS = 512  # frames one sendmsg takes at most (the kernel's limit, IOV_MAX, is 1024 on Linux)
_CONTROL = 1 << 63  # in a count word: a control message (its kind in the low bits), not a Dask message
_ACK = 2
SCHEME = "tdask"
LENT = 1 << 63  # in a frame's length word: the frame is lent (the wire holds where it lies, not its bytes)
_MAX_CONTROL = SMALL  # control payloads are read through the reused buffer
_Encoded = tuple[bytes, list["bytes | memoryview"], list[int]]  # a message's length words, frames, sizes
_MORE = object()  # the buffer holds only part of the next message
_AWAITED = object()  # the next message must be awaited: a control message, large or lent frames


class _Watch:
    """A stall timer of one wait on a socket (:meth:`SocketComm._watch`)."""

    def __init__(self, comm: SocketComm, done: asyncio.Future, midway: Callable[[], bool], stall: float) -> None:
        self.comm, self.done, self.midway, self.stall = comm, done, midway, stall
        self.handle = comm._loop.call_later(stall, self._check)

    def _check(self) -> None:
        if self.done.done():
            return
        quiet = self.comm._loop.time() - self.comm._progress
        if quiet >= self.stall and self.midway():
            self.done.set_exception(self.comm._malformed(
                f"it sent nothing for {quiet:.0f} s in the middle of a message (tdask.transfer.stall-timeout)"))
        else:
            self.handle = self.comm._loop.call_later(max(self.stall - quiet, 0.05), self._check)

    def cancel(self) -> None:
        self.handle.cancel()


class _Budget:
    """Bytes reserved for large frames still arriving on this event loop's streams (a worker's, a caller's)."""

    def __init__(self) -> None:
        self.used = 0
        self._waiters: deque[asyncio.Future] = deque()

    async def reserve(self, nbytes: int, limit: int) -> None:
        while self.used and self.used + nbytes > limit:  # alone, a message of any allowed size goes
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        while self._waiters:  # each waiter looks again
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


_budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Budget] = weakref.WeakKeyDictionary()


def _budget(loop: asyncio.AbstractEventLoop) -> _Budget:
    budget = _budgets.get(loop)
    if budget is None:
        budget = _budgets[loop] = _Budget()
    return budget


def receiving(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Bytes reserved now for large frames still arriving on ``loop``'s streams (this loop's by default)."""
    budget = _budgets.get(loop or asyncio.get_running_loop())
    return budget.used if budget is not None else 0


def socket_stream_wanted(address: str) -> bool:
    """Whether requests to the Dask address ``address`` take a tdask socket (``tdask.transfer.request-stream``)."""
    kind = config.get("transfer.request-stream")
    if kind not in ("socket", "dask"):
        raise ConfigError(f"tdask.transfer.request-stream must be 'socket' or 'dask', not {kind!r}")
    return kind == "socket" and address.startswith("tcp://")


class SocketComm(DaskComm):
    """A Dask comm on a plain socket, with :meth:`serve` and :meth:`try_write` for the request stream."""

    def __init__(self, sock: socket.socket, local_address: str, peer_address: str, deserialize: bool = True,
                 landing: Landing | None = None) -> None:
        super().__init__(deserialize)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._local_addr = local_address
        self._peer_addr = peer_address
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(SMALL)  # never resized: views of it stay valid
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._closed = False
        self._busy = 0  # reads and writes in progress
        self._landing = landing  # where a large frame is received, when not into a buffer of its own
        self._writing = asyncio.Lock()  # the stream's writer and this comm's own acks take turns
        self._tail: list[memoryview] | None = None  # what a synchronous send left unsent: it goes out before all else
        self._tail_task: asyncio.Task | None = None  # held here: the loop keeps only a weak reference to a task
        self.peer_shares_memory = False  # the peer's hello named our host: frames may be lent (:meth:`agree`)
        self._lent: dict[int, tuple[memoryview, lending.Lendable]] = {}  # token -> frame held until acked
        self._tokens = 0
        self._acks: list[int] = []
        self._acking: asyncio.Task | None = None
        self._borrowed_from: set[str] = set()  # the peer's regions mapped here
        self._thread = threading.get_ident()  # the loop's: a loan mapped here may be returned from any thread
        self._progress = self._loop.time()  # when bytes last came (a message that stops coming ends the stream)
        self.opened = False  # a request stream was opened on it (its hellos exchanged: agree)
        set_tcp_timeout(self)  # a silent peer is dropped as on Dask's comms (distributed.comm.timeouts.tcp)

    def __repr__(self) -> str:
        return f"<SocketComm to {self.peer_address}{' closed' if self._closed else ''}>"

    @property
    def local_address(self) -> str:
        return self._local_addr

    @property
    def peer_address(self) -> str:
        return self._peer_addr

    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Ends the connection once what is being written has left (a peer that stops reading gets
        ``tdask.transfer.connect-timeout``)."""
        if not self._closed:
            try:
                async with compat.timeout(config.seconds("transfer.connect-timeout")), self._writing:
                    await self._send_tail()
            except (CommClosedError, *TimeoutErrors):
                pass
        self.abort()

    @property
    def loans(self) -> int:
        """Frames lent to the peer that it has not acknowledged yet."""
        return len(self._lent)

    @property
    def sending(self) -> bool:
        """Whether bytes of an earlier synchronous send still wait to leave (:meth:`try_write`)."""
        return self._tail is not None

    def identity(self) -> bytes:
        """What this end says of its host in the stream's hello: frames may be lent to it by a peer that says
        the same (empty: lend it nothing)."""
        return lending.host_identity() if lending.wanted() else b""

    def agree(self, peer_identity: bytes) -> None:
        """Take the peer's hello: frames are lent to it only if it shares this host's ``/dev/shm``."""
        mine = lending.host_identity()
        self.peer_shares_memory = bool(mine) and peer_identity == mine and lending.wanted()
        self.opened = True

    def abort(self) -> None:
        """Ends the connection; a read or write in progress fails with CommClosedError.

        The socket is shut down rather than closed under a pending read or write: asyncio still
        watches its descriptor until that call returns, and a closed descriptor number can be reused.
        """
        if not self._closed:
            self._closed = True
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        lent, self._lent = self._lent, {}
        for _, region in lent.values():  # unacknowledged: the peer may read them yet, so never reuse them
            region.retire()
        if self._borrowed_from:  # the peer may be gone: the memory of its regions is not held here past that
            mappings.discard(self._borrowed_from)
            self._borrowed_from = set()
        self._release()

    def _release(self) -> None:
        if self._closed and not self._busy and self.socket.fileno() != -1:
            self.socket.close()

    # -- reading and writing ---------------------------------------------------------------
    async def _send(self, data: bytes | memoryview) -> None:
        """Sends ``data``; the caller holds ``_writing``."""
        await self._send_tail()
        await self._sendall(data)

    async def _send_tail(self) -> None:
        """What a synchronous send (:meth:`try_write`) left unsent goes before anything else."""
        if self._tail is not None:
            tail, self._tail = self._tail, None
            for part in tail:
                await self._sendall(part)

    async def _sendall(self, data: bytes | memoryview) -> None:
        call = self._loop.sock_sendall(self.socket, data)
        if self._closed:
            call.close()
            raise CommClosedError(f"{self!r}")
        self._busy += 1
        try:
            await call
        except OSError as e:
            self.abort()
            raise CommClosedError(f"connection to {self.peer_address} broke: {e}") from e
        finally:
            self._busy -= 1
            self._release()

    async def _recv(self, view: memoryview, minimum: int, idle: bool = False) -> int:
        """Receives into ``view`` until at least ``minimum`` bytes came; the descriptor stays watched meanwhile
        (``loop.sock_recv_into`` would watch and unwatch it for every chunk of a large frame). Unless the stream
        is ``idle`` (between messages), a peer that sends nothing for ``tdask.transfer.stall-timeout`` ends it."""
        got = self._recv_ready(view, 0)
        if got >= minimum:
            return got
        done = self._loop.create_future()
        fd = self.socket.fileno()
        self._busy += 1
        self._loop.add_reader(fd, self._on_readable, done, view, minimum, got)
        watch = None if idle else self._watch(done, lambda: True)
        try:
            return await done
        finally:
            if watch is not None:
                watch.cancel()
            self._loop.remove_reader(fd)  # before the descriptor may be closed
            self._busy -= 1
            self._release()

    def _watch(self, done: asyncio.Future, midway: Callable[[], bool]) -> _Watch:
        """Fails ``done`` once the peer sent nothing for ``tdask.transfer.stall-timeout`` while ``midway()``
        (a message begun): its reserved memory is not held for a peer that stopped."""
        return _Watch(self, done, midway, config.seconds("transfer.stall-timeout"))

    def _recv_ready(self, view: memoryview, got: int) -> int:
        """Takes what the socket holds now; raises at the end of the stream."""
        if self._closed:
            raise CommClosedError(f"{self!r}")
        while got < len(view):
            try:
                n = self.socket.recv_into(view[got:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.abort()
                raise CommClosedError(f"connection to {self.peer_address} broke: {e}") from e
            if n == 0:
                self.abort()
                raise CommClosedError(f"connection to {self.peer_address} was closed by the other side")
            got += n
            self._progress = self._loop.time()
        return got

    def _on_readable(self, done: asyncio.Future, view: memoryview, minimum: int, got: int) -> None:
        if done.done():
            return
        try:
            got = self._recv_ready(view, got)
        except CommClosedError as e:
            done.set_exception(e)
            return
        if got >= minimum:
            done.set_result(got)
        else:  # watched again with the new count
            self._loop.add_reader(self.socket.fileno(), self._on_readable, done, view, minimum, got)

    async def _buffered(self, n: int, idle: bool = False) -> bytes:
        """The next ``n`` (<= SMALL) bytes, through the reused buffer."""
        held = self._end - self._start
        if held < n:
            self._fit(n)
            self._end += await self._recv(self._view[self._end:], n - held, idle and held == 0)
        out = bytes(self._view[self._start:self._start + n])
        self._start += n
        return out

    def _exactly(self, n: int) -> Awaitable[bytes | memoryview]:
        return self._buffered(n) if n <= SMALL else self._large(n)

    async def _room(self, n: int) -> memoryview:
        """Where a large frame of ``n`` bytes is received: where this comm lands them, else a buffer of its own."""
        frame = await self._landing(n, False) if self._landing is not None else None
        if frame is IN_PLACE:
            frame = frame_pool().view(n)
        return memoryview(host_array(n)) if frame is None else frame

    async def _large(self, n: int) -> memoryview:
        frame = await self._room(n)
        try:
            held = min(n, self._end - self._start)
            frame[:held] = self._view[self._start:self._start + held]
            self._start += held
            if held < n:
                await self._recv(frame[held:], n - held)
        except BaseException:
            frame.release()  # its memory (a region of the pool, say) is given back now, not when collected
            raise
        return frame

    def _malformed(self, what: str) -> CommClosedError:
        self.abort()  # the stream cannot be trusted past a message it cannot read
        return CommClosedError(f"malformed message from {self.peer_address}: {what}")

    async def read(self, deserializers: Any = None) -> Any:
        while True:
            (count,) = U64.unpack(await self._buffered(8, idle=True))
            if not count & _CONTROL:
                return await self._message(count, deserializers)
            await self._control(count & ~_CONTROL)

    async def _message(self, count: int, deserializers: Any = None) -> Any:
        """The rest of a message of ``count`` frames, its count word read. Every length is checked against
        ``tdask.transfer.max-message-bytes`` before anything is allocated, and the message's large frames are
        reserved all at once within the process's budget (``tdask.transfer.receiving-bytes``): a stream waits
        for room (TCP holds its sender back) but never holds part of it while it waits."""
        if count > protocol.MAX_FRAMES:
            raise self._malformed(f"{count} frames (at most {protocol.MAX_FRAMES})")
        lengths = struct.unpack(f"<{count}Q", await self._exactly(8 * count)) if count else ()
        sent = [n for n in lengths if not n & LENT]
        limit = int(config.get("transfer.max-message-bytes"))
        if sum(sent) > limit:
            raise self._malformed(f"a {sum(sent)}-byte message, over tdask.transfer.max-message-bytes ({limit})")
        large = sum(n for n in sent if n > SMALL)
        budget = _budget(self._loop)
        if large:
            await budget.reserve(large, int(config.get("transfer.receiving-bytes")))
        frames: list = []
        try:
            for n in lengths:
                frames.append(await (self._borrowed(n & ~LENT) if n & LENT else self._exactly(n)))
        except BaseException:
            for frame in frames:  # a message cut short: what came of it is given back now
                if isinstance(frame, memoryview):
                    frame.release()
            raise
        finally:
            if large:
                budget.release(large)
        return self._loads(frames, deserializers)

    def _loads(self, frames: list, deserializers: Any = None) -> Any:
        try:
            return loads(frames, deserialize=True, deserializers=deserializers)
        except Exception as e:
            raise self._malformed(repr(e)) from e

    async def serve(self, handle: Callable[[Any], None]) -> None:
        """Hand each message to ``handle`` until the stream ends (raises CommClosedError, or what ``handle``
        raised). A message of small frames is read and handed over by the socket's readiness callback itself:
        one loop iteration sooner than a task woken by it (a request's answer, a worker's next request). The
        rest (control messages, large or lent frames) is read in this task, awaited."""
        while True:
            msg = self._parse_buffered()
            if msg is _AWAITED:
                (count,) = U64.unpack(await self._buffered(8))
                if count & _CONTROL:  # an ack: the message after it may be handed over again
                    await self._control(count & ~_CONTROL)
                else:
                    handle(await self._message(count))
            elif msg is not _MORE:
                handle(msg)
            else:
                await self._pump(handle)

    async def _pump(self, handle: Callable[[Any], None]) -> None:
        """Until the next message must be awaited: read, and hand over, from the readiness callback."""
        if self._closed:
            raise CommClosedError(f"{self!r}")
        done = self._loop.create_future()
        fd = self.socket.fileno()
        self._busy += 1
        self._loop.add_reader(fd, self._pumped, done, handle)
        watch = self._watch(done, lambda: self._end > self._start)  # part of a message is in: the rest must come
        try:
            await done
        finally:
            watch.cancel()
            self._loop.remove_reader(fd)  # before the descriptor may be closed
            self._busy -= 1
            self._release()

    def _pumped(self, done: asyncio.Future, handle: Callable[[Any], None]) -> None:
        if done.done():
            return
        try:
            self._end += self._recv_ready(self._view[self._end:], 0)  # room was made (_more)
            while True:
                msg = self._parse_buffered()
                if msg is _MORE:
                    return  # still watched: the rest comes with the next callback
                if msg is _AWAITED:
                    done.set_result(None)
                    return
                handle(msg)
                msg = None  # not held until the next message comes
        except Exception as e:  # the stream ended or is malformed, or the handler failed: serve() raises it
            if not done.done():
                done.set_exception(e)

    def _parse_buffered(self) -> Any:
        """The next message, if all of it is in the buffer and it is made of small frames only; else ``_MORE``
        (wait for more bytes) or ``_AWAITED`` (:meth:`serve` awaits it)."""
        start, held = self._start, self._end - self._start
        if held < 8:
            return self._more(8)
        (count,) = U64.unpack_from(self._buf, start)
        head = 8 + 8 * count
        if count & _CONTROL or head > SMALL:
            return _AWAITED
        if held < head:
            return self._more(head)
        lengths = struct.unpack_from(f"<{count}Q", self._buf, start + 8)
        total = head + sum(lengths)
        if total > SMALL:  # also when a frame is large or lent (those length words are huge)
            return _AWAITED
        if held < total:
            return self._more(total)
        frames, at = [], start + head
        for n in lengths:
            frames.append(bytes(self._view[at:at + n]))
            at += n
        self._start += total
        return self._loads(frames)

    def _fit(self, n: int) -> None:
        """Make room in the reused buffer for the next ``n`` (<= SMALL) bytes behind what it holds."""
        held = self._end - self._start
        if held == 0:
            self._start = self._end = 0
        elif self._start + n > SMALL:  # no room behind what is held: move it to the front
            self._buf[:held] = self._buf[self._start:self._end]
            self._start, self._end = 0, held

    def _more(self, n: int) -> Any:
        """The next ``n`` bytes are not all here yet: make room for them, and say so."""
        self._fit(n)
        return _MORE

    async def _control(self, kind: int) -> None:
        (size,) = U64.unpack(await self._buffered(8))
        if size > _MAX_CONTROL:
            raise self._malformed(f"a {size}-byte control message")
        payload = bytes(await self._exactly(size))
        if kind == _ACK and size % 8 == 0:
            for token in struct.unpack(f"<{size // 8}Q", payload):
                self._lent.pop(token, None)
        else:
            raise self._malformed(f"control message {kind} of {size} bytes")

    async def _borrowed(self, n: int) -> memoryview:
        """A frame the peer lent: copied out of its region (into where large frames land) and acknowledged,
        or mapped where it lies (a landing that says IN_PLACE) and acknowledged once its last view is gone."""
        if not self.peer_shares_memory or not LOAN.size < n <= LOAN.size + 255:
            raise self._malformed("a lent frame on a stream that shares no memory" if not self.peer_shares_memory
                                  else f"a {n}-byte loan")
        loan = bytes(await self._exactly(n))
        token, offset, nbytes = LOAN.unpack_from(loan)
        limit = int(config.get("transfer.max-message-bytes"))
        if nbytes > limit:
            raise self._malformed(f"a lent {nbytes}-byte frame, over tdask.transfer.max-message-bytes ({limit})")
        try:
            name = loan[LOAN.size:].decode()
            if offset + nbytes > mappings.size(name):  # checked before room is made for it
                raise ValueError(f"{nbytes} bytes at {offset} lie beyond the region {name!r}")
            room = await self._landing(nbytes, True) if self._landing is not None else None
            if room is IN_PLACE and mappings.may_borrow(nbytes):
                frame = mappings.borrow(name, offset, nbytes, functools.partial(self._returned, token))
                token = None  # acknowledged by _returned
            else:  # copied: where a frame sent through the socket would land, when it could not be mapped
                frame = await self._room(nbytes) if room is IN_PLACE else room
                frame = memoryview(host_array(nbytes)) if frame is None else frame
                mappings.copy(name, offset, nbytes, frame)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise self._malformed(f"its lent frame cannot be read ({e})") from e
        self._borrowed_from.add(name)
        lending.counts["borrowed"] += 1
        if token is not None:
            self._ack(token)
        return frame

    def _returned(self, token: int) -> None:
        """The last view of a loan mapped here is gone (in any thread): acknowledge it on the loop."""
        if self._closed:
            return  # the peer retired the region when the stream broke
        try:
            if threading.get_ident() == self._thread:
                self._loop.call_soon(self._ack, token)  # not now: this can be a collection amid anything
            else:
                self._loop.call_soon_threadsafe(self._ack, token)
        except RuntimeError:  # the loop is closed, and with it the stream
            pass

    def _ack(self, token: int) -> None:
        if self._closed:
            return
        self._acks.append(token)
        if self._acking is None:
            self._acking = asyncio.ensure_future(self._send_acks())

    async def _send_acks(self) -> None:
        try:
            async with self._writing:
                while self._acks and not self._closed:
                    tokens, self._acks = self._acks[:_MAX_CONTROL // 8], self._acks[_MAX_CONTROL // 8:]
                    await self._send(U64.pack(_CONTROL | _ACK) + U64.pack(8 * len(tokens))
                                     + struct.pack(f"<{len(tokens)}Q", *tokens))
        except CommClosedError:
            pass
        finally:
            self._acking = None

    def _lend(self, view: memoryview) -> bytes | None:
        found = lending.find(view)
        if found is None:
            copied = frame_pool().copy_in(view)  # e.g. a caller's tensor: two copies beat the socket's
            if copied is None:
                return None
            (region, view), offset = copied, 0
            lending.counts["staged"] += 1
        else:
            region, offset = found
            if isinstance(region, Borrowed):
                lending.counts["relent"] += 1
        self._tokens += 1
        self._lent[self._tokens] = (view, region)
        lending.counts["lent"] += 1
        return LOAN.pack(self._tokens, offset, view.nbytes) + region.name.encode()

    # -- writing (one message at a time: this comm's lock lets its acks in between the stream writer's) ----
    def encode(self, msg: Any, serializers: Any = None, on_error: str = "message") -> _Encoded:
        """The message's length words and frames; large frames lent where the peer shares memory."""
        if self._closed:
            raise CommClosedError(f"{self!r}")
        frames = dumps(msg, serializers=serializers, on_error=on_error,
                       context={"sender": "tdask", "recipient": self.peer_address})
        views: list[bytes | memoryview] = [ensure_memoryview(f) for f in frames]
        lengths = [v.nbytes for v in views]
        for i, view in enumerate(views):
            if view.nbytes > SMALL:
                loan = self._lend(view) if self.peer_shares_memory else None
                if loan is not None:
                    views[i], lengths[i] = loan, len(loan) | LENT
                else:
                    lending.counts["sent"] += 1
        head = U64.pack(len(views)) + struct.pack(f"<{len(views)}Q", *lengths)
        sizes = [n & ~LENT for n in lengths]
        return head, views, sizes

    async def write(self, msg: Any, serializers: Any = None, on_error: str = "message") -> int:
        return await self.write_encoded(self.encode(msg, serializers, on_error))

    async def write_encoded(self, encoded: _Encoded) -> int:
        head, views, sizes = encoded
        total = sum(sizes)
        async with self._writing:
            if total <= SMALL:
                await self._send(b"".join([head, *views]))
            else:
                await self._send(head)
                for view, size in zip(views, sizes, strict=True):
                    if size:
                        await self._send(view)
        return total + len(head)

    def try_write(self, msg: Any) -> _Encoded | None:
        """Send ``msg`` now, from the caller's own step, when nothing else is being written (the usual case):
        no task and no loop iteration for it. Returns None when it went (a rest the socket did not take goes
        out before anything else), else the encoded message for :meth:`write_encoded`."""
        encoded = self.encode(msg, on_error="raise")
        head, views, sizes = encoded
        small = sum(sizes) <= SMALL
        if self._writing.locked() or self._tail is not None or (not small and len(views) >= _MAX_PARTS):
            return encoded
        # small: one buffer; large: the frames where they lie, in one call (a large frame is not copied)
        parts = ([memoryview(b"".join([head, *views]))] if small
                 else [memoryview(part).cast("B") for part in (head, *views)])
        try:
            sent = self.socket.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self.abort()
            raise CommClosedError(f"connection to {self.peer_address} broke: {e}") from e
        for i, part in enumerate(parts):
            if sent < part.nbytes:
                self._tail = [part[sent:], *parts[i + 1:]]
                self._tail_task = asyncio.ensure_future(self._flush_tail())
                break
            sent -= part.nbytes
        return None

    async def _flush_tail(self) -> None:
        try:
            async with self._writing:
                await self._send_tail()
        except CommClosedError:
            pass
        finally:
            self._tail_task = None


class SocketConnector(Connector):
    """Opens a :class:`SocketComm` to a worker's request-stream listener (``tdask://host:port``)."""

    async def connect(self, address: str, deserialize: bool = True, landing: Landing | None = None,
                      **connection_args: Any) -> SocketComm:
        host, port = parse_host_port(address)  # Dask's registry hands a backend the address without its scheme
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))  # Dask's connect() bounds the wait and retries
        except BaseException:
            sock.close()
            raise
        local = sock.getsockname()
        return SocketComm(sock, address_of(local[0], local[1]), address_of(host, port), deserialize, landing)


class SocketListener(BaseListener):
    """Accepts request streams on ``host:port`` (0: a free port) and hands each, after Dask's handshake, to
    ``handle_comm`` (a worker's own)."""

    def __init__(self, address: str, handle_comm: Callable[[SocketComm], Any], deserialize: bool = True,
                 landing: Landing | None = None, **connection_args: Any) -> None:
        super().__init__()
        self.host, self.port = parse_host_port(address, 0)
        self.handle_comm = handle_comm
        self.deserialize = deserialize
        self.landing = landing
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.create_server((self.host, self.port), family=family, backlog=1024)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._task = asyncio.ensure_future(self._accept())

    @property
    def listen_address(self) -> str:
        return address_of(self.host, self.port)

    @property
    def contact_address(self) -> str:
        return address_of(ensure_concrete_host(self.host), self.port)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self._sock)
            except OSError as e:  # e.g. out of file descriptors: keep listening
                logger.warning("request-stream listener %s: accept failed: %s", self.listen_address, e)
                await asyncio.sleep(0.1)
                continue
            comm = SocketComm(conn, self.listen_address, address_of(peer[0], peer[1]), self.deserialize,
                              self.landing)
            task = asyncio.ensure_future(self._serve(comm))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _serve(self, comm: SocketComm) -> None:
        timeout = config.seconds("transfer.connect-timeout")
        try:
            await asyncio.wait_for(self.on_connection(comm), timeout)
        except (CommClosedError, OSError, *TimeoutErrors) as e:
            logger.debug("request stream from %s ended in its handshake: %r", comm.peer_address, e)
            comm.abort()
            return
        # a peer that never opens a request stream on it (no handler op, no hello) is not held open
        asyncio.get_running_loop().call_later(timeout, self._unopened, comm)
        result = self.handle_comm(comm)
        if asyncio.iscoroutine(result):
            await result

    @staticmethod
    def _unopened(comm: SocketComm) -> None:
        if not comm.opened and not comm.closed():
            logger.info("connection from %s opened no request stream in time: closed", comm.peer_address)
            comm.abort()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.abort_handshaking_comms()
        if self._sock is not None and self._sock.fileno() != -1:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())  # before the number can be reused
            self._sock.close()


def address_of(host: str, port: int) -> str:
    """The ``tdask://`` address of ``host:port`` (an IPv6 host in brackets), for :func:`distributed.comm.connect`."""
    return unparse_address(SCHEME, unparse_host_port(host, port))


class SocketBackend(BaseTCPBackend):
    """``tdask://``: Dask's TCP addressing, tdask's socket comm."""

    _connector_class = SocketConnector
    _listener_class = SocketListener


backends[SCHEME] = SocketBackend()
