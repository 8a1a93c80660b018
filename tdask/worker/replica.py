"""The Dask actor that hosts one replica of an operator on a worker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from distributed import get_worker
from distributed.comm import CommClosedError

from tdask import config as tdask_config
from tdask.comm import protocol
from tdask.compat import TimeoutErrors
from tdask.errors import (
    ConfigError,
    OperatorError,
    OverloadedError,
    ReplicaUnavailableError,
    TdaskError,
)
from tdask.operator import Operator, OperatorConfig, OperatorContext, Request, ResponseSink
from tdask.tensors import check_request_size, is_array
from tdask.triton.server import sweep_orphans
from tdask.worker.stats import ReplicaStats

logger = logging.getLogger(__name__)


class Slots:
    """``max_inflight`` slots: taken by requests run here, or lent to a caller's lane (:mod:`tdask.lanes`)."""

    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def take_nowait(self) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.take_nowait():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot as it was cancelled: pass it on
                self.give()
            else:
                self._waiters.remove(waiter)
            raise

    def give(self, count: int = 1) -> None:
        self.free += count
        while self.free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.free -= 1
                waiter.set_result(None)


class _MeasuredSink:
    """A streamed request's responses as its replica sees them: checked (arrays only), counted, and the time to
    the first one recorded."""

    __slots__ = ("sink", "replica", "started")

    def __init__(self, sink: ResponseSink, replica: Replica, started: float) -> None:
        self.sink, self.replica, self.started = sink, replica, started

    async def put(self, outputs: dict[str, Any] | None, final: bool) -> None:
        name = self.replica.config.name
        for key, value in (outputs or {}).items():
            if not is_array(value):
                raise OperatorError(f"operator {name!r} sent a non-array output {key!r}")
        await self.sink.put(outputs, final)
        if outputs is not None:
            stats = self.replica.stats
            if self.started:
                stats.first_responses.append((time.time(), time.perf_counter() - self.started))
                self.started = 0.0
            stats.responses += 1

    def fail(self, error: BaseException) -> None:
        self.sink.fail(error)


class Replica:
    """One replica of an operator, created with ``client.submit(Replica, ..., actor=True)``.

    The actor is the replica's identity and life cycle (start, stop, stats); requests
    reach it over the worker's tdask request stream (see :mod:`tdask.worker.extension`) so that
    calls share one connection per caller and worker instead of one per call. Its
    ``max_inflight`` slots run those requests, or are lent to callers' lanes
    (:mod:`tdask.worker.lanes`), which run small requests on its Triton server themselves.
    """

    def __init__(self, config: OperatorConfig, replica_id: str) -> None:
        self.config = config
        self.replica_id = replica_id
        self.worker = get_worker()
        self.address = self.worker.address
        self.extension = self.worker.extensions.get("tdask")
        if self.extension is None:
            raise ConfigError(f"tdask is not installed on worker {self.address}: register its worker plugin "
                              "(tdask.Deployment does: client.register_plugin(tdask.TdaskWorkerPlugin()))")
        self.stats = ReplicaStats()
        self.operator: Operator | None = None
        self._slots: Slots | None = None
        self._state = "created"
        self._idle: asyncio.Event | None = None
        # lanes: slots lent per caller's request stream, and how many of them were asked back
        self._leases: dict[Any, int] = {}
        self._revoking = 0

    # -- life cycle (actor methods, run on the worker's event loop) -------------------
    async def start(self) -> dict[str, Any]:
        """Build the operator and run its setup; returns what deploy prints."""
        # a replica placed again after a worker was SIGKILLed: remove what that worker left on this host
        await asyncio.to_thread(sweep_orphans)
        self._slots = Slots(self.config.max_inflight)
        self._idle = asyncio.Event()
        self._idle.set()
        cls = self.config.load_class()
        context = OperatorContext(self.config, self.replica_id, self.worker, self.extension.session,
                                  self.extension.services)
        self.operator = cls(self.config, context)
        await self.operator.setup()
        self._state = "running"
        self.extension.add_replica(self)
        logger.info("replica %s of %s started on %s", self.replica_id, self.config.name, self.address)
        return {**self.info(), "metadata": self.operator.metadata()}

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish, then tear the operator down."""
        if self._state in ("stopping", "stopped"):
            return
        self._state = "stopping"
        if drain_timeout is None:
            drain_timeout = tdask_config.seconds("replica.drain-timeout")
        self._revoke(self.stats.leased)  # lanes finish what they run and give their slots back
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
            except TimeoutErrors:
                logger.warning("replica %s: %d requests still running and %d slots lent after drain",
                               self.replica_id, self.stats.inflight + self.stats.queued, self.stats.leased)
        self.extension.remove_replica(self.replica_id)
        if self.operator is not None:
            await self.operator.teardown()
        self._state = "stopped"
        logger.info("replica %s of %s stopped", self.replica_id, self.config.name)

    def info(self) -> dict[str, Any]:
        info = {**self.config.describe(), "replica": self.replica_id, "worker": self.address,
                "state": self._state}
        if self.operator is not None:
            info.update(self.operator.info())
        return info

    def load(self) -> int | None:
        """Requests running or queued here from every caller; ``None`` when not serving."""
        if self._state != "running":
            return None
        return self.stats.inflight + self.stats.queued + self.stats.leased

    def get_stats(self) -> dict[str, Any]:
        return {**self.info(), **self.stats.snapshot()}

    # -- serving --------------------------------------------------------------------
    async def handle(self, request_id: str, inputs: dict[str, Any], parameters: dict[str, Any],
                     sink: ResponseSink | None = None) -> dict[str, Any]:
        """Queue, execute and answer one request; raises a :class:`TdaskError` on failure. With ``sink`` (a
        streamed request) the responses go there as the operator sends them, and the request holds its slot
        until its stream ends."""
        if self._state != "running" or self._slots is None:  # refused before it ran: another replica may take it
            raise ReplicaUnavailableError(f"replica {self.replica_id} of {self.config.name!r} is {self._state}",
                                          retryable=True)
        stats = self.stats
        max_queue = self.config.max_queue_size
        if max_queue is None:
            max_queue = int(tdask_config.get("replica.max-queue-size"))
        if stats.queued >= max_queue and not self._slots.free:
            stats.rejected += 1
            raise OverloadedError(
                f"operator {self.config.name!r} replica {self.replica_id} is overloaded: "
                f"{stats.inflight} in flight and {stats.queued} queued (max-queue-size {max_queue})",
                retryable=True)
        started = time.perf_counter()
        logger.debug("request %s: %s replica %s received", request_id, self.config.name, self.replica_id)
        stats.queued += 1
        self._idle.clear()
        try:
            if not self._slots.take_nowait():
                if stats.leased > self._revoking:  # a lane holds slots this request waits for: ask one back
                    self._revoke(1)
                try:
                    await self._slots.take()
                except BaseException:
                    stats.queued -= 1
                    raise
            stats.queued -= 1
            stats.inflight += 1
            try:
                if sink is not None:
                    sink = _MeasuredSink(sink, self, started)
                outputs = await self._execute(request_id, inputs, parameters, sink)
            finally:
                stats.inflight -= 1
                self._slots.give()
        except asyncio.CancelledError:
            stats.cancelled += 1  # its caller stopped reading (or went away), or the worker is closing
            raise
        except BaseException as e:
            stats.failed += 1
            logger.debug("request %s: %s replica %s failed: %r", request_id, self.config.name, self.replica_id, e)
            raise
        finally:
            self._check_idle()
        stats.completed += 1
        elapsed = time.perf_counter() - started
        stats.latencies.append((time.time(), elapsed))
        logger.debug("request %s: %s replica %s answered in %.2f ms", request_id, self.config.name,
                     self.replica_id, elapsed * 1e3)
        return outputs

    def _check_idle(self) -> None:
        stats = self.stats
        if stats.queued == 0 and stats.inflight == 0 and stats.leased == 0 and self._idle is not None:
            self._idle.set()

    # -- lanes: slots lent to callers (tdask.lanes) -----------------------------------------
    def lease(self, holder: Any, wanted: int) -> dict[str, Any]:
        """Lend up to ``wanted`` free slots to the caller on request stream ``holder`` (never ones a
        request here waits for), with what it needs to call this replica's Triton server itself."""
        lane = self.operator.lane() if self.operator is not None and self._state == "running" else None
        if lane is None:
            return {"granted": 0, "lane": None}
        granted = 0
        while granted < wanted and self._slots.take_nowait():
            granted += 1
        if granted:
            self._leases[holder] = self._leases.get(holder, 0) + granted
            self.stats.leased += granted
            self._idle.clear()
        return {"granted": granted, "lane": lane}

    def give_back(self, holder: Any, count: int, report: dict[str, Any] | None) -> None:
        """A lane returns ``count`` slots (asked back, idle, or its server went away), with what it ran."""
        if report:
            self.take_report(report)
        count = min(count, self._leases.get(holder, 0))
        if count <= 0:
            return
        self._leases[holder] -= count
        if not self._leases[holder]:
            del self._leases[holder]
        self._returned(count)

    def drop_holder(self, holder: Any) -> None:
        """The caller's request stream ended: every slot it held is free again."""
        count = self._leases.pop(holder, 0)
        if count:
            self._returned(count)

    def _returned(self, count: int) -> None:
        self.stats.leased -= count
        self._revoking = max(0, min(self._revoking - count, self.stats.leased))
        self._slots.give(count)
        self._check_idle()

    def take_report(self, report: dict[str, Any]) -> None:
        """Requests a lane ran on this replica's Triton server: they count here like those run here."""
        stats = self.stats
        completed, failed = int(report.get("completed", 0)), int(report.get("failed", 0))
        stats.completed += completed
        stats.failed += failed
        stats.on_lanes += completed + failed
        for sample in report.get("latencies", ()):
            stats.latencies.append((float(sample[0]), float(sample[1])))

    def _revoke(self, count: int) -> None:
        """Ask lanes for ``count`` slots back, from those holding the most first."""
        for holder in sorted(self._leases, key=self._leases.get, reverse=True):
            if count <= 0:
                return
            take = min(count, self._leases[holder])
            try:
                holder.send({"op": protocol.REVOKE, "replica": self.replica_id, "slots": take})
            except CommClosedError:
                continue  # its stream's end returns them
            self._revoking += take
            self.stats.revoked += take
            count -= take

    async def _execute(self, request_id: str, inputs: dict[str, Any], parameters: dict[str, Any],
                       sink: ResponseSink | None) -> dict[str, Any]:
        check_request_size(inputs, request_id)
        inputs = await self.extension.store.resolve(inputs, self.extension.session.fetch)
        request = Request(request_id, inputs, parameters, sink)
        try:
            await self.operator.execute([request])
        except TdaskError as e:
            e.started = True  # raised while running (e.g. by a call to another operator): not retryable
            raise
        except Exception as e:
            logger.exception("request %s: operator %s failed", request_id, self.config.name)
            raise OperatorError(f"operator {self.config.name!r} failed on request {request_id}: {e!r}") from e
        if request._error is not None:
            err = request._error
            if isinstance(err, TdaskError):
                err.started = True
                raise err
            raise OperatorError(f"operator {self.config.name!r}: {err}") from err
        if sink is not None:
            if not request.done:
                raise OperatorError(f"operator {self.config.name!r} returned without ending the stream of request "
                                    f"{request_id} ({request.sent} responses sent)")
            return {}
        if not request.done or request._outputs is None:
            raise OperatorError(f"operator {self.config.name!r} returned without answering request {request_id}")
        outputs = request._outputs
        for name, value in outputs.items():
            if not is_array(value):
                raise OperatorError(f"operator {self.config.name!r} returned a non-array output {name!r}")
        return outputs
