"""A handle to one deployed operator: requests spread over its replicas, retried where that is safe."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from distributed.comm import CommClosedError

from tdask import compat, config
from tdask.comm import protocol
from tdask.compat import TimeoutErrors
from tdask.errors import (
    InvalidRequestError,
    OperatorNotFoundError,
    ReplicaUnavailableError,
    RequestTimeoutError,
    from_wire,
)
from tdask.operator import ResponseChannel
from tdask.registry import operator_key, pick_version
from tdask.session.futures import InferFuture, InferResult, OutputOf, new_request_id
from tdask.session.routing import choose_replica
from tdask.session.streaming import LocalUpstream, Opened, ResponseStream, Upstream, WireUpstream
from tdask.tensors import check_request_size, check_tensor
from tdask.tensors import from_wire as tensor_from_wire
from tdask.tensors import to_wire as tensor_to_wire

_PARAM_TYPES = (bool, int, float, str)


class RemoteOperator:
    """Calls to one deployed operator, spread over its replicas.

    >>> encoder = await session.operator("encoder")          # doctest: +SKIP
    >>> result = await encoder.infer({"input": np.arange(5)})  # doctest: +SKIP
    """

    def __init__(self, session: Any, name: str, version: int, record: dict[str, Any]) -> None:
        """``session``: the :class:`~tdask.Session` that made it (its streams, its worker's local replicas)."""
        self.session = session
        self.name = name
        self.version = version
        self._set_record(record)
        self.outstanding: dict[str, int] = defaultdict(int)
        self._counter = itertools.count()
        self._down: dict[str, float] = {}
        self._refreshed = time.monotonic()

    def _set_record(self, record: dict[str, Any]) -> None:
        self.record = record
        self.replicas: dict[str, str] = {r["replica"]: r["worker"] for r in record.get("replicas", [])}
        self._replica_list = list(self.replicas)
        self.idempotent = bool(record.get("config", {}).get("idempotent", False))
        local = self.session.local
        # workers whose replicas' Triton servers this process may call itself (tdask.worker.lanes)
        self._lane_workers = local.lane_workers(record) if local is not None else set()

    def __repr__(self) -> str:
        return f"<RemoteOperator {self.name} v{self.version}: {len(self.replicas)} replicas>"

    async def _refresh_before(self, deadline: float, timeout: float, request_id: str) -> None:
        """Refresh within the request's deadline. Where the scheduler cannot be reached, the replicas known
        are used (requests go to workers directly); with none known, that is the request's error."""
        try:
            async with compat.timeout(max(0.0, deadline - time.monotonic())):
                await self.refresh()
        except TimeoutErrors:
            raise RequestTimeoutError(f"request {request_id} to operator {self.name!r}: no answer from the scheduler "
                                      f"about its replicas within {timeout:g} s") from None
        except (OSError, CommClosedError) as e:  # TimeoutError is caught above
            self._refreshed = time.monotonic()
            if not self.replicas:
                raise ReplicaUnavailableError(f"operator {self.name!r}: cannot reach the scheduler to find its "
                                              f"replicas ({e})", retryable=True) from e

    async def refresh(self) -> None:
        """Re-read the replica list (replicas move when workers die and come back)."""
        self._refreshed = time.monotonic()
        versions = await self.session.lookup(operator_key(self.name))
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
        if keep not in (True, False, "auto"):
            raise InvalidRequestError(f"keep must be True, False or 'auto', got {keep!r}")
        msg, timeout, deadline = await self._request(protocol.INFER, inputs, parameters, request_id, timeout,
                                                     output_device)
        msg["keep"] = keep
        local = self.session.local

        def call(replica: str, worker: str) -> Awaitable[dict[str, Any]]:
            if local is not None and worker == local.address:
                return local.call(msg)  # same process: no comm, no serialization, no copy
            if worker in self._lane_workers and keep is not True and output_device != "gpu":
                return self._via_lane(replica, worker, msg)
            return self._sent(worker, msg)

        reply, replica, worker = await self._route(msg, call, deadline, timeout)
        outputs = {name: tensor_from_wire(v) for name, v in reply["outputs"].items()}
        return InferResult(self.session, outputs, replica, worker, request_id)

    def stream(
        self,
        inputs: Mapping[str, Any] | None = None,
        parameters: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        output_device: str | None = None,
    ) -> ResponseStream:
        """Send one request whose answer is a sequence of responses; iterate what it returns::

            async with operator.stream({"input": x}) as responses:
                async for response in responses:   # each an InferResult, in order
                    ...

        A single-response operator's stream has one response. ``timeout`` bounds the wait for each response
        (the first and every next one). Leaving the ``async with`` (or :meth:`ResponseStream.cancel`) before
        the end cancels the request where it runs; an error or a lost worker after some responses ends the
        iteration with an explicit error. At most ``tdask.request.stream-window`` responses wait unread: a
        slow reader slows the operator down.
        """
        request_id = request_id or new_request_id()
        stream = ResponseStream(self.session, request_id, self.name)
        stream.start(self._stream(inputs, parameters, request_id, timeout, output_device))
        return stream

    async def _stream(self, inputs: Any, parameters: Any, request_id: str, timeout: float | None,
                      output_device: str | None) -> Opened:
        msg, timeout, deadline = await self._request(protocol.STREAM, inputs, parameters, request_id, timeout,
                                                     output_device)
        window = max(1, int(config.get("request.stream-window")))
        msg["window"] = window
        local = self.session.local

        async def call(replica: str, worker: str) -> dict[str, Any]:
            channel = ResponseChannel(window)
            if local is not None and worker == local.address:
                task = local.stream(dict(msg), channel)
                upstream: Upstream = LocalUpstream(task, channel)
            else:
                worker_stream = self.session.pool.get(worker)
                upstream = WireUpstream(worker_stream, await worker_stream.stream(_for_wire(msg), channel), window)
            try:
                first = await channel.get()
            except BaseException:  # timed out or cancelled before the first response
                upstream.cancel()
                raise
            upstream.read(1)
            if first[2] is not None:
                return {"error": first[2]}
            return {"opened": Opened(upstream, channel, replica, worker, first, timeout)}

        reply, _, _ = await self._route(msg, call, deadline, timeout)
        return reply["opened"]

    async def _request(self, op: str, inputs: Any, parameters: Any, request_id: str, timeout: float | None,
                       output_device: str | None) -> tuple[dict[str, Any], float, float]:
        """The request's message, checked, with its timeout and deadline."""
        checked_inputs = await self._prepare_inputs(inputs, request_id)
        params = _check_parameters(parameters, request_id)
        if output_device not in (None, "cpu", "gpu"):
            raise InvalidRequestError(f"output_device must be None, 'cpu' or 'gpu', got {output_device!r}")
        if timeout is None:
            timeout = config.seconds("request.timeout")
        deadline = time.monotonic() + timeout
        if time.monotonic() - self._refreshed > config.seconds("routing.refresh-interval") or not self.replicas:
            await self._refresh_before(deadline, timeout, request_id)
        msg = {"op": op, "request_id": request_id, "inputs": checked_inputs, "parameters": params,
               "output_device": output_device}
        return msg, timeout, deadline

    async def _route(self, msg: dict[str, Any], call: Callable[[str, str], Awaitable[dict[str, Any]]],
                     deadline: float, timeout: float) -> tuple[dict[str, Any], str, str]:
        """Send ``msg`` with ``call(replica, worker)`` to a replica, and to another where the first one refused it
        before it ran (or the operator is idempotent); the answer, and which replica and worker gave it."""
        request_id = msg["request_id"]
        down_for = config.seconds("routing.refresh-interval")
        tried: set[str] = set()
        last_error: Exception | None = None
        refreshed = False
        local = self.session.local
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
            msg["replica"] = replica
            self.outstanding[replica] += 1
            try:
                async with compat.timeout(max(0.0, deadline - time.monotonic())):  # no extra task
                    reply = await call(replica, worker)
            except TimeoutErrors:
                raise RequestTimeoutError(
                    f"request {request_id} to operator {self.name!r} (replica {replica} on {worker}) "
                    f"had no answer within {timeout:g} s"
                ) from None
            except ReplicaUnavailableError as e:
                self._down[replica] = time.monotonic() + down_for
                if e.retryable or self.idempotent:
                    last_error = e
                    continue
                raise
            finally:
                self.outstanding[replica] -= 1
            if "error" in reply:
                error = reply["error"]
                if not isinstance(error, Exception):
                    error = from_wire(error)
                unavailable = isinstance(error, ReplicaUnavailableError)
                if error.retryable or (unavailable and self.idempotent):
                    if unavailable:
                        self._down[replica] = time.monotonic() + down_for
                        if not refreshed:  # the replica list may be stale (redeployed): re-read it once
                            refreshed = True
                            await self._refresh_before(deadline, timeout, request_id)
                    last_error = error
                    continue
                raise error
            return reply, replica, worker

    async def _via_lane(self, replica: str, worker: str, msg: dict[str, Any]) -> dict[str, Any]:
        """Run on the replica's Triton server from this worker, where the replica lends a slot
        (:mod:`tdask.worker.lanes`); else sent to the replica."""
        reply = await self.session.local.on_lane(replica, worker, msg, self.idempotent)
        return reply if reply is not None else await self._sent(worker, msg)

    def _sent(self, worker: str, msg: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """The request sent to its replica's worker, inputs encoded for the wire."""
        return self.session.pool.get(worker).call(_for_wire(msg))

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


def _for_wire(msg: dict[str, Any]) -> dict[str, Any]:
    """A copy of a request's message with its inputs encoded for the wire (``msg`` stays as it is, for a retry on a
    replica in this process)."""
    return dict(msg, inputs={k: tensor_to_wire(v) for k, v in msg["inputs"].items()})


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
