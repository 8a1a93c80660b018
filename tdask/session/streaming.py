"""A streamed request in flight (:class:`ResponseStream`) and the two ways its responses reach the caller: from a
replica in the same process (:class:`LocalUpstream`) or over a request stream (:class:`WireUpstream`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, NamedTuple, Protocol

from tdask import compat
from tdask.comm import protocol
from tdask.compat import TimeoutErrors
from tdask.errors import ReplicaUnavailableError, RequestTimeoutError
from tdask.operator import ResponseChannel
from tdask.session.futures import InferResult, KeptTensors
from tdask.tensors import from_wire as tensor_from_wire


class Upstream(Protocol):
    """Where a stream's responses come from: told how many were read (room for more) and when to stop."""

    def read(self, count: int) -> None: ...

    def cancel(self) -> None: ...


class LocalUpstream:
    """A replica in this process produces into the stream's (bounded) channel itself."""

    def __init__(self, task: asyncio.Task, channel: ResponseChannel) -> None:
        self.task, self.channel = task, channel

    def read(self, count: int) -> None:
        pass

    def cancel(self) -> None:
        self.channel.close()
        self.task.cancel()


class WireUpstream:
    """A replica on another worker: read responses are acknowledged in batches (``credit``), and a stop is a
    ``cancel`` message."""

    def __init__(self, stream: Any, call_id: int, window: int) -> None:
        self.stream, self.call_id = stream, call_id
        self.batch = max(1, window // 2)
        self.unacknowledged = 0

    def read(self, count: int) -> None:
        self.unacknowledged += count
        if self.unacknowledged >= self.batch:
            self.stream.send({"op": protocol.CREDIT, "id": self.call_id, "count": self.unacknowledged})
            self.unacknowledged = 0

    def cancel(self) -> None:
        self.stream.receiving.pop(self.call_id, None)
        self.stream.send({"op": protocol.CANCEL, "id": self.call_id})


class Opened(NamedTuple):
    """A stream a replica took: where its responses come from, its first response, and its timeout."""

    upstream: Upstream
    channel: ResponseChannel
    replica: str
    worker: str
    first: tuple[dict[str, Any] | None, bool, BaseException | None]
    timeout: float


class ResponseStream:
    """The responses to one streamed request (:meth:`tdask.RemoteOperator.stream`), each an :class:`InferResult`,
    in order. Iterate it inside ``async with``: leaving early cancels the request upstream. Once iteration ends
    normally the stream was complete; a broken one raises."""

    def __init__(self, session: KeptTensors, request_id: str, operator: str) -> None:
        self.request_id = request_id
        self.operator = operator
        self.received = 0  # responses handed out so far
        self._session = session
        self._opening: asyncio.Task | None = None
        self._opened: Opened | None = None
        self._ended = False

    def start(self, opening: Coroutine[Any, Any, Opened]) -> None:
        self._opening = asyncio.ensure_future(opening)  # the request leaves at once, like infer()'s

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> InferResult:
        if self._ended:
            raise StopAsyncIteration
        try:
            if self._opened is None:
                self._opened = await self._opening
                outputs, final, error = self._opened.first
            else:
                opened = self._opened
                try:
                    # a response here already needs no timer
                    async with compat.timeout(None if opened.channel.items else opened.timeout):
                        outputs, final, error = await opened.channel.get()
                except TimeoutErrors:
                    raise RequestTimeoutError(
                        f"request {self.request_id} to operator {self.operator!r}: no response within "
                        f"{opened.timeout:g} s after {self.received}") from None
                opened.upstream.read(1)
        except BaseException:
            self.cancel()
            raise
        if error is not None:
            self._ended = True
            if self.received and isinstance(error, ReplicaUnavailableError):
                raise ReplicaUnavailableError(f"the stream of request {self.request_id} from operator "
                                              f"{self.operator!r} broke after {self.received} responses: {error}",
                                              started=True) from error
            raise error
        self._ended = final
        if outputs is None:  # the end, without a response of its own
            raise StopAsyncIteration
        self.received += 1
        opened = self._opened
        return InferResult(self._session, {name: tensor_from_wire(v) for name, v in outputs.items()},
                           opened.replica, opened.worker, self.request_id)

    @property
    def ended(self) -> bool:
        """Whether the last response (or an error) was read."""
        return self._ended

    def cancel(self) -> None:
        """Stop the request where it runs (nothing happens once it ended)."""
        if self._ended:
            return
        self._ended = True
        if self._opened is not None:
            self._opened.upstream.cancel()
        elif self._opening is not None:
            self._opening.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        if not self._ended and self._opened is not None:  # dropped unread: stop it upstream
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.call_soon(self._opened.upstream.cancel)
