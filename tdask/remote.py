"""Handles to deployed operators: :class:`Session`, :class:`RemoteOperator` and futures."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from typing import Any

import numpy as np
from distributed import Client

from tdask import config
from tdask.connection import StreamPool, error_from_wire
from tdask.errors import (
    InvalidRequestError,
    OperatorNotFoundError,
    ReplicaUnavailableError,
    RequestTimeoutError,
)
from tdask.lanes import LaneClosed, Lanes
from tdask.registry import ROOT, operator_key, pick_version
from tdask.routing import choose_replica
from tdask.socket_comm import Landing, caller_landing
from tdask.store import fetch_kept
from tdask.tensors import TensorRef, check_request_size, check_tensor, from_wire, to_wire

logger = logging.getLogger(__name__)

_PARAM_TYPES = (bool, int, float, str)
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

    def __init__(self, session: Session, outputs: dict[str, Any], replica: str, worker: str, request_id: str) -> None:
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
            weakref.finalize(self, session._release_threadsafe, where, keys)

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]

    def __repr__(self) -> str:
        return f"<InferResult {self.request_id} from {self.replica}: {sorted(self.outputs)}>"

    async def fetch(self, name: str) -> Any:
        """The tensor ``name`` as an array, fetched from its worker if it was kept there."""
        value = self.outputs[name]
        if isinstance(value, TensorRef):
            return (await fetch_kept(self._session.rpc, value.worker, [value.key]))[value.key]
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
    wake-up) per call: at 1,000 elements, concurrency 1, ~0.1 ms of CPU and ~0.2 ms of latency per pipeline
    request in encoder_decoder's worker (two calls; old and new alternating in one process).
    """

    def __init__(self, coro: Coroutine[Any, Any, InferResult], request_id: str) -> None:
        self.request_id = request_id
        self._coro: Coroutine[Any, Any, InferResult] | None = coro
        self._task: asyncio.Task | None = None
        self._done: asyncio.Future | None = None  # the outcome, once the request ran in an awaiting task
        self._awaiter: asyncio.Task | None = None  # that task, while the request runs there
        self._loop = asyncio.get_running_loop()
        self._start_handle: asyncio.Handle | None = self._loop.call_soon(self._start)

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


class RemoteOperator:
    """Calls to one deployed operator, spread over its replicas.

    >>> encoder = await session.operator("encoder")          # doctest: +SKIP
    >>> result = await encoder.infer({"input": np.arange(5)})  # doctest: +SKIP
    """

    def __init__(self, session: Session, name: str, version: int, record: dict[str, Any]) -> None:
        self.session = session
        self.name = name
        self.version = version
        self._set_record(record)
        self.outstanding: dict[str, int] = defaultdict(int)
        self._counter = itertools.count()
        self._down: dict[str, float] = {}
        self._refreshed = time.monotonic()
        # read once: dask.config lookups cost more than the rest of a local call
        self._default_timeout = config.seconds("request.timeout")
        self._refresh_interval = config.seconds("routing.refresh-interval")

    def _set_record(self, record: dict[str, Any]) -> None:
        self.record = record
        self.replicas: dict[str, str] = {r["replica"]: r["worker"] for r in record.get("replicas", [])}
        self._replica_list = list(self.replicas)
        self.idempotent = bool(record.get("config", {}).get("idempotent", False))
        lanes = self.session.lanes
        # replicas whose Triton server this process may call itself (tdask.lanes), for small requests
        self._lane_workers = {worker for worker in self.replicas.values() if lanes.reaches(worker)} \
            if lanes is not None and lanes.serves(record) else set()

    def __repr__(self) -> str:
        return f"<RemoteOperator {self.name} v{self.version}: {len(self.replicas)} replicas>"

    async def refresh(self) -> None:
        """Re-read the replica list (replicas move when workers die and come back)."""
        self._refreshed = time.monotonic()
        versions = await self.session._lookup(operator_key(self.name))
        try:
            _, record = pick_version(self.name, versions, self.version, [])
        except OperatorNotFoundError:
            record = {"replicas": []}
        self._set_record(record)

    def infer(
        self,
        inputs: Mapping[str, Any] | None = None,
        parameters: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
        keep: bool | str = False,
        timeout: float | None = None,
        output_device: str | None = None,
    ) -> InferFuture:
        """Send one request; returns at once with a future.

        ``inputs`` map names to arrays, :class:`TensorRef` or ``other_future.output(name)``
        (the tensor then moves worker to worker, not through this caller). ``keep=True``
        leaves large outputs on the replica's worker for the next operator; ``"auto"``
        keeps only outputs above ``tdask.transfer.inline-threshold``. ``output_device="cpu"``
        returns NumPy arrays, ``"gpu"`` CuPy arrays on the replica's GPU; ``None`` as produced.
        """
        request_id = request_id or new_request_id()
        return InferFuture(self._infer(inputs, parameters, request_id, keep, timeout, output_device), request_id)

    async def _infer(self, inputs: Any, parameters: Any, request_id: str, keep: bool | str,
                     timeout: float | None, output_device: str | None = None) -> InferResult:
        checked_inputs = await self._prepare_inputs(inputs, request_id)
        params = _check_parameters(parameters, request_id)
        if keep not in (True, False, "auto"):
            raise InvalidRequestError(f"keep must be True, False or 'auto', got {keep!r}")
        if output_device not in (None, "cpu", "gpu"):
            raise InvalidRequestError(f"output_device must be None, 'cpu' or 'gpu', got {output_device!r}")
        if timeout is None:
            timeout = self._default_timeout
        deadline = time.monotonic() + timeout
        if time.monotonic() - self._refreshed > self._refresh_interval or not self.replicas:
            await self.refresh()
        tried: set[str] = set()
        last_error: Exception | None = None
        refreshed = False
        local = self.session.local_service
        while True:
            if self._down:
                now = time.monotonic()
                excluded = tried | {r for r, until in self._down.items() if until > now}
            else:
                excluded = tried
            replica = None
            if local is not None:
                # keep the request (and its tensors) in this process while a replica here has a free slot:
                # its load from every caller is known here, unlike that of replicas elsewhere
                replica = local.free_replica(self._replica_list, excluded)
            if replica is None:
                replica = choose_replica(self._replica_list, self.outstanding, next(self._counter), excluded)
            if replica is None and not tried and excluded:
                replica = choose_replica(self._replica_list, self.outstanding, next(self._counter), tried)
            if replica is None:
                if last_error is not None:
                    raise last_error
                raise ReplicaUnavailableError(f"operator {self.name!r} has no running replica")
            tried.add(replica)
            worker = self.replicas[replica]
            msg = {"op": "infer", "replica": replica, "request_id": request_id, "inputs": checked_inputs,
                   "parameters": params, "keep": keep, "output_device": output_device}
            self.outstanding[replica] += 1
            if (worker in self._lane_workers and keep is not True and output_device != "gpu"
                    and self.session.lanes.fits(checked_inputs)):
                call = self._via_lanes(replica, worker, msg)
            elif self.session.in_process(worker):
                call = local.call_local(msg)  # same process: no comm, no serialization, no copy
            else:
                call = self._sent(worker, msg)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # no extra task
                    reply = await call
            except TimeoutError:
                raise RequestTimeoutError(
                    f"request {request_id} to operator {self.name!r} (replica {replica} on {worker}) "
                    f"had no answer within {timeout:g} s"
                ) from None
            except ReplicaUnavailableError as e:
                self._down[replica] = time.monotonic() + self._refresh_interval
                if getattr(e, "retryable", False) or self.idempotent:
                    last_error = e
                    continue
                raise
            finally:
                self.outstanding[replica] -= 1
            if "error" in reply:
                wire = reply["error"]
                error = error_from_wire(wire)
                unavailable = wire.get("type") == "ReplicaUnavailableError"
                if wire.get("retryable") or (unavailable and self.idempotent):
                    if unavailable:
                        self._down[replica] = time.monotonic() + self._refresh_interval
                        if not refreshed:  # the replica list may be stale (redeployed): re-read it once
                            refreshed = True
                            await self.refresh()
                    last_error = error
                    continue
                raise error
            outputs = {name: from_wire(v) for name, v in reply["outputs"].items()}
            return InferResult(self.session, outputs, replica, worker, request_id)

    async def _via_lanes(self, replica: str, worker: str, msg: dict[str, Any]) -> dict[str, Any]:
        """Run the request on the replica's Triton server from here (:mod:`tdask.lanes`) on a slot it lent,
        answered like the replica would; sent to the replica when it lends none, or when the server refuses
        the connection (restarted: the replica waits for it)."""
        lanes = self.session.lanes
        lane = lanes.take(replica) or await lanes.ask(replica, worker)
        if lane is not None:
            try:
                outputs = await lanes.infer(lane, msg["inputs"], msg["parameters"], msg["request_id"],
                                            self.idempotent)
            except LaneClosed:
                pass
            else:  # outputs a replica would keep on its worker with keep="auto" are kept on this one, where they are
                return {"outputs": self.session.local_service.encode_outputs(outputs, msg["keep"], serialize=False)}
        return await self._sent(worker, msg)

    def _sent(self, worker: str, msg: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """The request sent to its replica's worker, inputs encoded for the wire."""
        msg["inputs"] = {k: to_wire(v) for k, v in msg["inputs"].items()}
        return self.session.pool.get(worker).call(msg)

    async def _prepare_inputs(self, inputs: Any, request_id: str) -> dict[str, Any]:
        if inputs is None:
            return {}
        if not isinstance(inputs, Mapping):
            raise InvalidRequestError(
                f"request {request_id}: inputs must be a mapping of names to tensors, got {type(inputs).__name__}"
            )
        checked = {}
        for name, value in inputs.items():
            if isinstance(value, OutputOf):
                value = await value.resolve()
            checked[name] = check_tensor(name, value)
        check_request_size(checked, request_id)
        return checked  # encoded for the wire only when the replica is in another process


def _check_parameters(parameters: Any, request_id: str) -> dict[str, Any]:
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise InvalidRequestError(
            f"request {request_id}: parameters must be a mapping, got {type(parameters).__name__}"
        )
    out = {}
    for key, value in parameters.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(key, str) or not isinstance(value, _PARAM_TYPES):
            raise InvalidRequestError(
                f"request {request_id}: parameter {key!r} must be a bool, int, float or str, got {type(value).__name__}"
            )
        out[key] = value
    return out


class Session:
    """A caller's view of the deployed operators of one Dask cluster.

    Made by :func:`connect` on a client, or for operators on a worker by
    :func:`worker_session`; both speak to replicas over the same request streams.
    """

    def __init__(
        self,
        lookup: Callable[[list[str]], Awaitable[Any]],
        rpc: Any,
        connection_args: dict[str, Any],
        client: Client | None = None,
        owns_client: bool = False,
        landing: Landing | None = None,
    ) -> None:
        self._lookup = lookup
        self.rpc = rpc
        self.pool = StreamPool(connection_args, landing)
        self.client = client
        self._owns_client = owns_client
        self._operators: dict[tuple[str, int | None], RemoteOperator] = {}
        self._loop = asyncio.get_running_loop()
        self.local_service: Any = None  # the WorkerService of this process, for a worker's session
        self.lanes: Lanes | None = None  # a worker's session runs small Triton requests itself where it can

    async def operator(self, name: str, version: int | None = None) -> RemoteOperator:
        """The handle to ``name`` at ``version`` (latest when ``None``)."""
        cached = self._operators.get((name, version))
        if cached is not None:
            return cached
        versions = await self._lookup(operator_key(name))
        known = list((await self._lookup(ROOT)) or {}) if not versions else []
        version_found, record = pick_version(name, versions, version, known)
        op = RemoteOperator(self, name, version_found, record)
        self._operators[(name, version)] = op
        return op

    async def operators(self) -> dict[str, Any]:
        """Every deployed operator's record, by name and version."""
        return (await self._lookup(ROOT)) or {}

    def in_process(self, worker: str) -> bool:
        """Whether ``worker`` is the worker this (worker's) session runs in: calls there need no comm."""
        return self.local_service is not None and worker == self.local_service.worker.address

    def _release_threadsafe(self, worker: str, keys: list[str]) -> None:
        try:
            if self.in_process(worker):  # kept by an in-process call: no stream to this worker exists
                self._loop.call_soon_threadsafe(self.local_service.store.release, keys)
            else:
                self._loop.call_soon_threadsafe(self.pool.get(worker).send, {"op": "release", "keys": keys})
        except RuntimeError:  # loop closed: the worker's TTL cleans up
            pass

    async def close(self) -> None:
        if self.lanes is not None:
            await self.lanes.close()
        await self.pool.close()
        if self._owns_client and self.client is not None:
            await self.client.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(address: str | Client | None = None, *, security: Any = None) -> Session:
    """Open a :class:`Session` on the cluster at ``address`` (or on an async ``Client``)."""
    if isinstance(address, Client):
        client, owns = address, False
    else:
        client = await Client(address, asynchronous=True, direct_to_workers=True, security=security)
        owns = True

    async def lookup(keys: list[str]) -> Any:
        return await client.get_metadata(keys, default=None)

    return Session(lookup, client.rpc, dict(client.connection_args), client=client, owns_client=owns,
                   landing=caller_landing)


def worker_session(worker: Any) -> Session:
    """The session that operators on ``worker`` share to call other operators."""
    session = getattr(worker, "_tdask_session", None)
    if session is None:

        async def lookup(keys: list[str]) -> Any:
            return await worker.scheduler.get_metadata(keys=keys, default=None)

        from tdask.service import WorkerService

        service = WorkerService.of(worker)
        # tensors this worker receives from others (answers, fetched outputs) land where its Triton reads them
        session = Session(lookup, worker.rpc, dict(worker.connection_args), landing=service.landing)
        session.local_service = service
        if config.get("lanes.enabled"):
            session.lanes = Lanes(session, worker.address)
        worker._tdask_session = session
    return session
