"""A request in flight (:class:`InferFuture`) and its answer (:class:`InferResult`)."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
import weakref
from collections import defaultdict
from collections.abc import Coroutine, Generator
from typing import Any, Protocol

from tdask import config
from tdask.errors import InvalidRequestError
from tdask.tensors import TensorRef


class KeptTensors(Protocol):
    """Where an answer's kept outputs are fetched and released: the session that sent the request."""

    async def fetch(self, worker: str, keys: list[str]) -> dict[str, Any]: ...

    def release_threadsafe(self, worker: str, keys: list[str]) -> None: ...


_request_ids = itertools.count()
_id_prefix: tuple[int, str] = (0, "")


def new_request_id() -> str:
    """A random per-process prefix and a counter: unique, and cheaper than a uuid4 per request."""
    global _id_prefix
    pid = os.getpid()
    if _id_prefix[0] != pid:  # a forked child must not repeat its parent's ids
        _id_prefix = (pid, uuid.uuid4().hex[:6])
    return f"{_id_prefix[1]}{next(_request_ids):06x}"



class InferResult:
    """The answer to one request: output tensors, and who answered.

    Outputs kept on the producing worker appear as :class:`TensorRef`; pass them (or
    ``future.output(name)``) to another operator to move them worker to worker, or
    :meth:`fetch` them here.
    """

    def __init__(self, session: KeptTensors, outputs: dict[str, Any], replica: str, worker: str,
                 request_id: str) -> None:
        self.outputs = outputs
        self.replica = replica
        self.worker = worker
        self.request_id = request_id
        self._session = session
        kept: dict[str, list[str]] = defaultdict(list)  # by the worker that keeps them (a lane keeps them here)
        for value in outputs.values():
            if isinstance(value, TensorRef):
                kept[value.worker].append(value.key)
        for where, keys in kept.items():
            weakref.finalize(self, session.release_threadsafe, where, keys)

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]

    def __repr__(self) -> str:
        return f"<InferResult {self.request_id} from {self.replica}: {sorted(self.outputs)}>"

    async def fetch(self, name: str) -> Any:
        """The tensor ``name`` as an array, fetched from its worker if it was kept there."""
        value = self.outputs[name]
        if isinstance(value, TensorRef):
            return (await self._session.fetch(value.worker, [value.key]))[value.key]
        return value


class OutputOf:
    """``future.output(name)``: the named output of a request not yet answered."""

    def __init__(self, future: InferFuture, name: str) -> None:
        self.future = future
        self.name = name

    async def resolve(self) -> Any:
        result = await self.future
        try:
            return result.outputs[self.name]
        except KeyError:
            raise InvalidRequestError(
                f"request {result.request_id} has no output {self.name!r} (outputs: {sorted(result.outputs)})"
            ) from None


class InferFuture:
    """A request in flight. ``await`` it for the :class:`InferResult`; await it as often as you like.

    A future awaited before the loop's next iteration (``await op.infer(...)``, the usual case) runs its
    request in the awaiting task; otherwise the request starts as a task of its own in that iteration, as
    with ``asyncio.ensure_future``. A task of its own costs its creation and two loop iterations (start,
    wake-up) per call (what that costs a pipeline: docs/design.md). ``tdask.request.run-in-awaiting-task:
    false`` gives every request a task of its own.
    """

    def __init__(self, coro: Coroutine[Any, Any, InferResult], request_id: str) -> None:
        self.request_id = request_id
        self._coro: Coroutine[Any, Any, InferResult] | None = coro
        self._task: asyncio.Task | None = None
        self._done: asyncio.Future | None = None  # the outcome, once the request ran in an awaiting task
        self._awaiter: asyncio.Task | None = None  # that task, while the request runs there
        self._loop = asyncio.get_running_loop()
        self._start_handle: asyncio.Handle | None = None
        if config.get("request.run-in-awaiting-task"):
            self._start_handle = self._loop.call_soon(self._start)
        else:
            self._start()

    def _start(self) -> None:
        """Not awaited in the iteration that made it: the request runs as a task of its own."""
        self._start_handle = None
        if self._coro is not None:
            coro, self._coro = self._coro, None
            self._task = self._loop.create_task(coro)

    def __await__(self) -> Generator[Any, None, InferResult]:
        if self._coro is not None:  # awaited at once: run here, no task of its own
            coro, self._coro = self._coro, None
            if self._start_handle is not None:
                self._start_handle.cancel()
                self._start_handle = None
            self._done = self._loop.create_future()
            self._awaiter = asyncio.current_task()
            try:
                result = yield from coro.__await__()
            except BaseException as e:
                if isinstance(e, asyncio.CancelledError):
                    self._done.cancel()
                else:
                    self._done.set_exception(e)
                    self._done.exception()  # retrieved: raised here; later awaits raise it again
                raise
            finally:
                self._awaiter = None
            self._done.set_result(result)
            return result
        return (yield from (self._task if self._task is not None else self._done).__await__())

    def done(self) -> bool:
        outcome = self._task if self._task is not None else self._done
        return outcome is not None and outcome.done()

    def cancel(self) -> bool:
        """Cancel the request; one that runs in the task awaiting it is cancelled with that task, as the
        awaiter of a cancelled task would be."""
        if self._coro is not None:
            self._start()
        if self._task is not None:
            return self._task.cancel()
        return self._awaiter is not None and self._awaiter.cancel()

    def output(self, name: str) -> OutputOf:
        """Use one output of this request as the input of another call."""
        return OutputOf(self, name)
