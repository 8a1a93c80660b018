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
    """A request in flight, as a task of its own from the moment it is made (like ``asyncio.ensure_future``).
    ``await`` it for the :class:`InferResult`, as often as you like, from any number of tasks.

    (Running a request in the task that awaits it at once was measured and removed: docs/design.md.)
    """

    def __init__(self, coro: Coroutine[Any, Any, InferResult], request_id: str) -> None:
        self.request_id = request_id
        self._task = asyncio.ensure_future(coro)

    def __await__(self) -> Generator[Any, None, InferResult]:
        return self._task.__await__()

    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> bool:
        """Cancel the request (its caller's side: a request already sent may still run on its replica)."""
        return self._task.cancel()

    def output(self, name: str) -> OutputOf:
        """Use one output of this request as the input of another call."""
        return OutputOf(self, name)
