"""Lanes: an operator on a worker runs small requests of a Triton operator on that replica's server itself.

A call to a replica on another worker puts that worker's event loop on the request path twice (the
request in, the answer out) around a call to a Triton server that the caller could make itself: the
server listens on this host. With deploy's default placement (a worker per operator) a pipeline request
crosses four such process hand-offs; on lanes it crosses none of them (what that buys: docs/design.md).

The replica stays in charge of its requests. It lends a caller some of its ``max_inflight`` slots
(never one a request waiting there needs) over the caller's request stream; each lent slot runs one
request at a time. When a request of another caller has to wait, or the replica stops, it asks slots
back and the lane returns them as their requests finish. The lane reports what it ran (completed,
failed, latencies) so the replica's statistics, dashboard and ``/metrics`` count every request, and
returns its slots after ``tdask.lanes.idle-timeout`` without a request, closing its connections to
the server with the last one. Only small requests take a lane (inputs under the shared-memory
threshold, CPU models, ``tcp://`` workers of this host, not ``keep=True``). A request that finds no
free lent slot asks for more and waits for the answer; everything else, and a request for which no slot
is lent, goes to the replica as before. ``tdask.lanes.enabled: false`` turns lanes off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
from distributed.comm import get_address_host, parse_address

from tdask import config
from tdask.comm import protocol
from tdask.errors import ReplicaUnavailableError, TdaskError, TritonError
from tdask.operator import TRITON_ALIASES
from tdask.triton.client import TritonModelClient

logger = logging.getLogger(__name__)


class LaneClosed(Exception):
    """The lane's server refused the connection (restarted or gone): nothing ran, send the request as usual."""


class Lane:
    """Slots one replica lent this process, and the client of that replica's Triton server."""

    def __init__(self, replica: str, worker: str, info: dict[str, Any]) -> None:
        self.replica = replica
        self.worker = worker
        self.model = info["model"]
        self.connect(info)
        self.held = 0  # slots lent to this process
        self.busy = 0  # of them, running a request
        self.owed = 0  # busy ones the replica asked back: returned as their requests finish
        self.last_used = time.monotonic()
        self._completed = 0
        self._failed = 0
        self._latencies: list[tuple[float, float]] = []

    def connect(self, info: dict[str, Any]) -> None:
        self.server = info["server"]
        self.client = TritonModelClient(info["grpc"], info["http"])  # HTTP only: inputs are below shared memory

    @property
    def free(self) -> int:
        return self.held - self.busy  # (owed slots are busy ones)

    def report(self) -> dict[str, Any] | None:
        """What ran since the last report, for the replica's statistics; None when nothing did."""
        if not (self._completed or self._failed):
            return None
        report = {"completed": self._completed, "failed": self._failed, "latencies": self._latencies}
        self._completed, self._failed, self._latencies = 0, 0, []
        return report

    def record(self, ok: bool, seconds: float) -> None:
        if ok:
            self._completed += 1
            self._latencies.append((time.time(), seconds))
        else:
            self._failed += 1


class Lanes:
    """A worker session's lanes, by replica; told by the session's streams of revocations and lost workers."""

    def __init__(self, session: Any, local_address: str) -> None:
        self.session = session
        self.local_address = local_address
        self._local_host = get_address_host(local_address)
        self._lanes: dict[str, Lane] = {}
        self._asking: set[str] = set()
        self._early: dict[str, int] = {}  # slots asked back while this process's ask to that replica was answered
        self._not_before: dict[str, float] = {}  # replica -> when it may be asked again
        self._tick: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()
        self.ran: Counter[str] = Counter()  # requests run on lanes, by replica (the worker's tdask stats)
        session.pool.listener = self

    # -- who takes a lane ------------------------------------------------------------------
    def workers(self, record: dict[str, Any]) -> set[str]:
        """The workers of an operator's replicas that may lend this process slots: none when lanes are off or
        the operator is not a Triton model on the CPU run as configured."""
        cfg = record.get("config", {})
        if (not config.get("lanes.enabled") or cfg.get("implementation") not in TRITON_ALIASES
                or cfg.get("device", "CPU") != "CPU"):
            return set()
        return {r["worker"] for r in record.get("replicas", []) if self.reaches(r["worker"])}

    def reaches(self, worker: str) -> bool:
        """A ``tcp://`` worker of this host in another process: its Triton server listens on this host's loopback."""
        if worker == self.local_address:
            return False
        scheme, _ = parse_address(worker)
        return scheme == "tcp" and get_address_host(worker) == self._local_host

    @staticmethod
    def fits(inputs: dict[str, Any]) -> bool:
        """Small NumPy tensors only: larger ones go to the replica, which moves them in shared memory."""
        size = 0
        for value in inputs.values():
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
                return False
            size += value.nbytes
        return size < (int(config.get("triton.shared-memory-threshold") or 0) or 2**16)

    async def run(self, replica: str, worker: str, inputs: dict[str, Any], parameters: dict[str, Any],
                  request_id: str, idempotent: bool) -> dict[str, Any] | None:
        """The outputs of one request run on a slot ``replica`` lent; None when it takes no lane (too large, no
        slot lent, or the server refused the connection: the request then goes to the replica as usual)."""
        if not self.fits(inputs):
            return None
        lane = self.take(replica) or await self.ask(replica, worker)
        if lane is None:
            return None
        try:
            return await self.infer(lane, inputs, parameters, request_id, idempotent)
        except LaneClosed:
            return None

    # -- slots -----------------------------------------------------------------------------
    def take(self, replica: str) -> Lane | None:
        """The lane to ``replica`` with one of its free slots taken for a request; None when it has none."""
        lane = self._lanes.get(replica)
        if lane is not None and lane.free > 0:
            lane.busy += 1
            return lane
        return None

    async def ask(self, replica: str, worker: str) -> Lane | None:
        """Slots of ``replica``, one of them taken for this request; None when it lends none now, or while
        another request of this process asks it (such requests go to the replica)."""
        if replica in self._asking or time.monotonic() < self._not_before.get(replica, 0.0):
            return None
        lane = self._lanes.get(replica)
        wanted = max(1, lane.busy) if lane is not None else 1  # grows by doubling under load
        self._asking.add(replica)
        try:
            reply = await self.session.pool.get(worker).call({"op": protocol.LEASE, "replica": replica,
                                                               "slots": wanted})
        except Exception as e:  # noqa: BLE001 - the worker is going away: the request goes (and fails) as usual
            logger.debug("asking replica %s on %s for lane slots failed: %r", replica, worker, e)
            reply = {"granted": 0}
        finally:
            self._asking.discard(replica)
            early = self._early.pop(replica, 0)  # asked back before this answer was read
        granted, info = int(reply.get("granted", 0)), reply.get("lane")
        if not granted:
            # a replica with no free slot: soon again; one offering no lane (not serving, server restarting): later
            self._not_before[replica] = time.monotonic() + (config.seconds("lanes.ask-again") if info
                                                            else config.seconds("routing.refresh-interval"))
            return None
        lane = self._lanes.get(replica)
        if lane is not None and lane.server != info["server"]:  # its server was restarted: a new client
            self._close_client(lane)
            lane.connect(info)
        elif lane is None:
            lane = self._lanes[replica] = Lane(replica, worker, info)
            logger.debug("lane to replica %s on %s (Triton pid %s)", replica, worker, lane.server)
        lane.held += granted
        if self._tick is None or self._tick.done():
            self._tick = asyncio.ensure_future(self._tend())
        if early:
            self._revoked(lane, early)
        return self.take(replica)

    def done(self, lane: Lane, ok: bool | None, seconds: float) -> None:
        """One request on ``lane`` ended: ``ok`` False counts as failed, None (it never ran) not at all."""
        lane.busy -= 1
        lane.last_used = time.monotonic()
        if ok is not None:
            lane.record(ok, seconds)
            self.ran[lane.replica] += 1
        if self._lanes.get(lane.replica) is not lane:  # given back meanwhile: what it ran still counts there
            self._report(lane)
        elif lane.owed:
            lane.owed -= 1
            self._give_back(lane, 1)

    def _give_back(self, lane: Lane, count: int) -> None:
        if count <= 0:
            return
        lane.held -= count
        self.session.pool.get(lane.worker).send(
            {"op": protocol.LEASE_RETURN, "replica": lane.replica, "slots": count, "report": lane.report()})
        if lane.held <= 0:
            self._drop(lane)

    def _drop(self, lane: Lane) -> None:
        if self._lanes.get(lane.replica) is lane:
            del self._lanes[lane.replica]
        self._close_client(lane)

    def _close_client(self, lane: Lane) -> None:
        """Its connections are closed at once: a Triton server waits for open ones when it is stopped."""
        task = asyncio.ensure_future(lane.client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def broken(self, lane: Lane) -> None:
        """The lane's server went away: every slot goes back (the replica knows more than this process)."""
        if self._lanes.get(lane.replica) is lane:
            lane.owed = 0
            self._give_back(lane, lane.held)

    # -- what the streams tell ---------------------------------------------------------------
    def pushed(self, address: str, msg: dict[str, Any]) -> None:
        if msg.get("op") != protocol.REVOKE:
            logger.warning("unknown message from worker %s: %r", address, msg.get("op"))
            return
        replica, slots = msg.get("replica"), int(msg.get("slots", 1))
        lane = self._lanes.get(replica)
        if lane is not None:
            slots -= self._revoked(lane, slots)
        if slots > 0 and replica in self._asking:  # slots granted in an answer not read yet
            self._early[replica] = self._early.get(replica, 0) + slots

    def _revoked(self, lane: Lane, slots: int) -> int:
        """Give back up to ``slots`` of ``lane``: idle ones now, busy ones as they finish; how many that is."""
        wanted = min(slots, lane.held - lane.owed)
        idle = min(wanted, lane.free)
        lane.owed += wanted - idle
        if idle > 0:
            self._give_back(lane, idle)
        return wanted

    def lost(self, address: str) -> None:
        """The stream to ``address`` ended: its replicas took back what they lent, with nothing said."""
        for lane in [lane for lane in self._lanes.values() if lane.worker == address]:
            self._drop(lane)

    async def _tend(self) -> None:
        """Reports what lanes ran, and returns the slots of lanes left idle; ends with the last lane."""
        while self._lanes:
            await asyncio.sleep(config.seconds("lanes.report-interval"))
            now, idle_timeout = time.monotonic(), config.seconds("lanes.idle-timeout")
            for lane in list(self._lanes.values()):
                if lane.busy == 0 and now - lane.last_used >= idle_timeout:
                    self._give_back(lane, lane.held)
                else:
                    self._report(lane)

    def _report(self, lane: Lane) -> None:
        report = lane.report()
        if report is not None:
            self.session.pool.get(lane.worker).send({"op": protocol.LEASE_REPORT, "replica": lane.replica,
                                                     "report": report})

    # -- one request -----------------------------------------------------------------------------
    async def infer(self, lane: Lane, inputs: dict[str, Any], parameters: dict[str, Any],
                    request_id: str, idempotent: bool) -> dict[str, Any]:
        """Run one request on the lane's server, as the replica's operator would."""
        started = time.perf_counter()
        ok: bool | None = False
        try:
            outputs = await lane.client.infer(lane.model, inputs, parameters=parameters, request_id=request_id,
                                              idempotent=idempotent)
            ok = True
            return outputs
        except TdaskError as e:
            connection = e.connection if isinstance(e, TritonError) else None  # "refused" or "lost"
            if connection is None:
                raise
            self.broken(lane)
            if connection == "refused":
                ok = None
                raise LaneClosed(str(e)) from e
            raise ReplicaUnavailableError(
                f"the Triton server of replica {lane.replica} on {lane.worker} went away while running request "
                f"{request_id}; it may or may not have run ({e})") from e
        except Exception as e:
            raise TritonError(f"{lane.model}: {e}") from e
        finally:
            seconds = time.perf_counter() - started
            self.done(lane, ok, seconds)
            if ok:
                logger.debug("request %s: %s replica %s answered on a lane (Triton pid %s) in %.2f ms", request_id,
                             lane.model, lane.replica, lane.server, seconds * 1e3)

    def stats(self) -> dict[str, Any]:
        """Requests run on lanes so far, by replica, and the slots held now."""
        return {"ran": dict(self.ran), "held": {rid: lane.held for rid, lane in self._lanes.items()}}

    async def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
        for lane in list(self._lanes.values()):
            self._drop(lane)
        await asyncio.gather(*self._closing, return_exceptions=True)
