"""tdask on one worker process: the request streams it serves and the replicas, Triton servers and session it holds.

Installed by :class:`tdask.worker.plugin.TdaskWorkerPlugin` as ``worker.extensions["tdask"]``. It adds three
handlers to the worker (:mod:`tdask.comm.protocol`): ``tdask_stream`` serves a caller's request stream (one
long-lived, batched, multiplexed comm per caller, on the worker's Dask comms or on its tdask socket, opened
by ``tdask_stream_socket``), and ``tdask_stats`` answers the dashboard. Each message of a stream goes to
the handler the protocol's table names. The operators hosted here call other operators through
:attr:`WorkerExtension.session`, which calls replicas in this process without a comm and runs small
requests on lanes (:mod:`tdask.worker.lanes`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from distributed.comm import CommClosedError, get_address_host, listen
from distributed.core import Status
from distributed.protocol import to_serialize

from tdask import config
from tdask.comm import protocol, tcp
from tdask.comm.stream import accept_stream, read_messages
from tdask.comm.writer import CoalescingWriter
from tdask.compat import TimeoutErrors
from tdask.errors import InvalidRequestError, ProtocolError, ReplicaUnavailableError, TdaskError, to_wire
from tdask.operator import ResponseSink
from tdask.registry import token_key
from tdask.session import Session
from tdask.tensors import inline_threshold, nbytes
from tdask.tensors import to_wire as tensor_to_wire
from tdask.triton.servers import TritonServers
from tdask.worker.lanes import Lanes
from tdask.worker.store import OutputStore

logger = logging.getLogger(__name__)


class _StreamEnded(Exception):
    """The caller closed its request stream."""


def place_outputs(outputs: dict[str, Any], device: str | None) -> dict[str, Any]:
    """Move outputs to the device the caller asked for: ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy)."""
    if device is None:
        return outputs
    if device == "cpu":
        return {k: (v.get() if hasattr(v, "__cuda_array_interface__") else v) for k, v in outputs.items()}
    try:
        import cupy
    except ImportError:
        raise InvalidRequestError("output_device='gpu' asked of a worker without CuPy") from None
    return {k: cupy.asarray(v) for k, v in outputs.items()}


class WireSink:
    """The responses of a request streamed to a caller in another process, sent on its request stream as the
    operator sends them, at most ``window`` beyond those the caller said it read (``credit``)."""

    def __init__(self, sender: CoalescingWriter, call_id: Any, window: int, encode: Callable[[dict], dict]) -> None:
        self.sender = sender
        self.call_id = call_id
        self.credits = max(1, window)
        self.encode = encode
        self.cancelled = False  # by its caller
        self._room: asyncio.Future | None = None

    async def put(self, outputs: dict[str, Any] | None, final: bool) -> None:
        while self.credits <= 0:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        self.credits -= 1
        self.sender.send({"id": self.call_id, "outputs": None if outputs is None else self.encode(outputs),
                          "final": final})

    def grant(self, count: int) -> None:
        self.credits += count
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    def fail(self, error: BaseException) -> None:
        try:
            self.sender.send({"id": self.call_id, "error": to_wire(error), "final": True})
        except CommClosedError:
            logger.info("caller went away before the stream %s ended", self.call_id)


class _PlacedSink:
    """Responses streamed to a caller in this process, on the device it asked for."""

    def __init__(self, sink: ResponseSink, device: str | None) -> None:
        self.sink, self.device = sink, device

    async def put(self, outputs: dict[str, Any] | None, final: bool) -> None:
        await self.sink.put(None if outputs is None else place_outputs(outputs, self.device), final)

    def fail(self, error: BaseException) -> None:
        self.sink.fail(error)


class WorkerExtension:
    """tdask on the worker ``worker``; see the module's docstring."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.address: str = worker.address
        self.replicas: dict[str, Any] = {}  # replica id -> tdask.worker.replica.Replica
        self.store = OutputStore(worker.address)
        self.triton = TritonServers(worker.address, str(worker.name))
        self.services: dict[str, Any] = {"triton": self.triton}  # what hosted operators may use
        self.streams: set[CoalescingWriter] = set()  # one per caller's request stream
        self._serving: set[asyncio.Task] = set()  # requests being answered (the loop holds tasks weakly)
        # streamed requests being answered, by (caller's request stream, call id)
        self._streaming: dict[tuple[CoalescingWriter, Any], tuple[asyncio.Task, WireSink]] = {}
        self._listener: Any = None
        self._reaper: asyncio.Task | None = None
        self._closed = False
        # only a caller that shows it (read from the scheduler: a member of the cluster) is told this host's identity
        self.token = secrets.token_urlsafe(24)

        async def lookup(keys: list[str]) -> Any:
            return await worker.scheduler.get_metadata(keys=keys, default=None)

        # tensors this worker receives from others (answers, fetched outputs) land where its Triton reads them
        self.session = Session(lookup, dict(worker.connection_args), landing=self.triton.landing, local=self)
        self.lanes = Lanes(self.session, worker.address)
        self._ops: dict[str, Callable[[dict[str, Any], CoalescingWriter], None]] = {
            protocol.INFER: self._on_infer,
            protocol.STREAM: self._on_stream,
            protocol.CREDIT: self._on_credit,
            protocol.CANCEL: self._on_cancel,
            protocol.FETCH: self._on_fetch,
            protocol.RELEASE: lambda msg, sender: self.store.release(msg.get("keys") or []),
            protocol.LEASE: self._on_lease,
            protocol.LEASE_RETURN: self._on_lease_return,
            protocol.LEASE_REPORT: self._on_lease_report,
        }
        worker.handlers[protocol.STREAM_HANDLER] = self.handle_stream
        worker.handlers[protocol.SOCKET_HANDLER] = self.handle_stream_socket
        worker.handlers[protocol.STATS_HANDLER] = self.stats

    async def publish(self) -> None:
        """Put this worker's request-stream token where its callers find it: the scheduler's metadata."""
        await self.worker.scheduler.set_metadata(keys=token_key(self.address), value=self.token)

    # -- replicas ------------------------------------------------------------------------------
    def add_replica(self, replica: Any) -> None:
        self.replicas[replica.replica_id] = replica
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap_orphans())

    def remove_replica(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    async def _reap_orphans(self) -> None:
        """Stop replicas whose actor Dask has released (their deployer went away without stopping them, e.g.
        ``python -m deploy`` was SIGKILLed), so their Triton models and servers do not outlive the deployment
        on workers the user keeps running."""
        while True:
            await asyncio.sleep(config.seconds("replica.orphan-check-interval"))
            live = {id(a) for a in self.worker.state.actors.values()}
            for rid, replica in list(self.replicas.items()):
                if id(replica) not in live:
                    logger.warning("replica %s of %s was released by its deployer; stopping it", rid,
                                   replica.config.name)
                    try:
                        await replica.stop(drain_timeout=5)
                    except Exception:
                        logger.exception("stopping orphaned replica %s", rid)

    # -- what this worker's session does in this process (tdask.session.WorkerSide) -------------
    def free_replica(self, candidates: list[str], exclude: set[str]) -> str | None:
        best, best_load = None, None
        for rid in candidates:
            replica = self.replicas.get(rid)
            if replica is None or rid in exclude:
                continue
            load = replica.load()
            if load is not None and load < replica.config.max_inflight and (best_load is None or load < best_load):
                best, best_load = rid, load
        return best

    def call(self, msg: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """A request from an operator in this same process: no comm, no (de)serialization."""
        return self._answer(msg, serialize=False)

    def stream(self, msg: dict[str, Any], sink: ResponseSink) -> asyncio.Task:
        """A streamed request from an operator in this same process: its responses go to ``sink`` as they come."""
        return asyncio.ensure_future(self._produce(msg, _PlacedSink(sink, msg.get("output_device"))))

    def fetch(self, keys: list[str]) -> dict[str, Any]:
        return self.store.get_many(keys)

    def release(self, keys: list[str]) -> None:
        self.store.release(keys)

    def lane_workers(self, record: dict[str, Any]) -> set[str]:
        return self.lanes.workers(record)

    async def on_lane(self, replica: str, worker: str, msg: dict[str, Any], idempotent: bool) -> dict[str, Any] | None:
        outputs = await self.lanes.run(replica, worker, msg["inputs"], msg["parameters"], msg["request_id"],
                                       idempotent)
        if outputs is None:
            return None
        # outputs a replica would keep on its worker with keep="auto" are kept on this one, where they are
        return {"outputs": self.encode_outputs(outputs, msg["keep"], serialize=False)}

    # -- the request stream ----------------------------------------------------------------------
    async def handle_stream(self, comm: Any, **kwargs: Any) -> Status:
        try:
            await accept_stream(comm, config.seconds("transfer.connect-timeout"), self.token)
        except (ProtocolError, CommClosedError, OSError, *TimeoutErrors) as e:
            logger.warning("request stream from %s refused: %s", comm.peer_address, e)
            comm.abort()
            return Status.dont_reply
        sender = CoalescingWriter(comm)
        self.streams.add(sender)
        ops = self._ops

        def dispatch(msg: dict[str, Any]) -> None:
            op = msg.get("op")
            handler = ops.get(op)
            if handler is not None:
                handler(msg, sender)
            elif op == protocol.CLOSE:
                raise _StreamEnded
            else:
                logger.warning("tdask stream: unknown op %r from %s", op, comm.peer_address)

        try:
            await read_messages(comm, dispatch)
        except (CommClosedError, _StreamEnded):
            pass
        finally:
            self.streams.discard(sender)
            for key in [key for key in self._streaming if key[0] is sender]:  # its caller went away: stop them
                self._streaming[key][1].cancelled = True
                self._streaming[key][0].cancel()
            for replica in self.replicas.values():
                replica.drop_holder(sender)
            sender.abort()
        return Status.dont_reply

    def _on_infer(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        task = asyncio.ensure_future(self._serve(msg, sender))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        try:
            reply = await self._answer(msg, serialize=True)
        except asyncio.CancelledError:  # the worker is closing
            reply = {"error": to_wire(ReplicaUnavailableError(
                "request cancelled (its worker is closing); it may or may not have run", started=True))}
        reply["id"] = msg["id"]
        try:
            sender.send(reply)
        except CommClosedError:
            logger.info("caller went away before request %s was answered", msg.get("request_id"))

    def _on_stream(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        device = msg.get("output_device")
        sink = WireSink(sender, msg.get("id"), int(msg.get("window") or 1),
                        lambda outputs: self.encode_outputs(place_outputs(outputs, device), False))
        key = (sender, msg.get("id"))
        task = asyncio.ensure_future(self._produce(msg, sink))
        self._streaming[key] = (task, sink)
        task.add_done_callback(lambda _: self._streaming.pop(key, None))

    async def _produce(self, msg: dict[str, Any], sink: Any) -> None:
        """Run one streamed request on its replica; an error ends its stream, whenever it comes."""
        try:
            await self._replica(msg).handle(msg.get("request_id", ""), msg.get("inputs") or {},
                                            msg.get("parameters") or {}, sink)
        except asyncio.CancelledError:
            if not getattr(sink, "cancelled", True):  # not by its caller: the worker is closing
                sink.fail(ReplicaUnavailableError("request cancelled (its worker is closing)", started=True))
            raise
        except Exception as e:
            if not isinstance(e, TdaskError):
                logger.exception("request %s failed", msg.get("request_id"))
            sink.fail(e)

    def _on_credit(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        entry = self._streaming.get((sender, msg.get("id")))
        if entry is not None:
            entry[1].grant(int(msg.get("count", 0)))

    def _on_cancel(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        entry = self._streaming.get((sender, msg.get("id")))
        if entry is not None:
            entry[1].cancelled = True
            entry[0].cancel()

    def _on_fetch(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        """Kept tensors asked for by a caller or another worker, answered on the stream it already has to this
        one (which lands them where its Triton reads them: an output kept here is the next model's input
        there without a copy)."""
        try:
            reply: dict[str, Any] = {"tensors": {k: to_serialize(v) for k, v in self.store.get_many(
                msg.get("keys")).items()}}
        except TdaskError as e:
            reply = {"error": to_wire(e)}
        reply["id"] = msg.get("id")
        sender.send(reply)

    def _on_lease(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        replica = self.replicas.get(msg.get("replica"))
        reply = replica.lease(sender, int(msg.get("slots", 1))) if replica is not None else {"granted": 0}
        sender.send({**reply, "id": msg.get("id")})

    def _on_lease_return(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        replica = self.replicas.get(msg.get("replica"))
        if replica is not None:
            replica.give_back(sender, int(msg.get("slots", 0)), msg.get("report"))

    def _on_lease_report(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        replica = self.replicas.get(msg.get("replica"))
        if replica is not None:
            replica.take_report(msg.get("report") or {})

    async def handle_stream_socket(self) -> dict[str, int | None]:
        """The port of this worker's tdask socket for request streams (opened on the first ask); None: requests
        come on Dask comms only."""
        if not tcp.socket_stream_wanted(self.address):
            return {"port": None}
        if self._listener is None:
            host, port = get_address_host(self.address), int(config.get("transfer.request-stream-port"))
            listener = listen(tcp.address_of(host, port), self.worker.handle_comm, deserialize=True,
                              landing=self.triton.landing)
            try:
                await listener.start()
            except OSError as e:
                raise OSError(f"cannot listen on {host}:{port} for request streams ({e}); set "
                              "tdask.transfer.request-stream-port to a free port, or tdask.transfer.request-stream "
                              "to 'dask' to take requests on the worker's Dask comms") from e
            self._listener = listener
            logger.info("request streams on %s", listener.listen_address)
        return {"port": self._listener.port}

    def _replica(self, msg: dict[str, Any]) -> Any:
        """The replica a request names; never reached it otherwise: another replica may take it."""
        replica = self.replicas.get(msg.get("replica"))
        if replica is None:
            raise ReplicaUnavailableError(f"replica {msg.get('replica')} is not running on worker {self.address}",
                                          retryable=True)
        return replica

    async def _answer(self, msg: dict[str, Any], serialize: bool) -> dict[str, Any]:
        """Run one request on its replica: outputs or an error, never nothing."""
        try:
            outputs = await self._replica(msg).handle(msg.get("request_id", ""), msg.get("inputs") or {},
                                                      msg.get("parameters") or {})
            outputs = place_outputs(outputs, msg.get("output_device"))
            return {"outputs": self.encode_outputs(outputs, msg.get("keep", False), serialize)}
        except Exception as e:
            if not isinstance(e, TdaskError):
                logger.exception("request %s failed", msg.get("request_id"))
            return {"error": to_wire(e)}

    def encode_outputs(self, outputs: dict[str, Any], keep: bool | str, serialize: bool = True) -> dict[str, Any]:
        """Outputs as an answer carries them: kept here when asked and large, else the tensors themselves."""
        threshold = inline_threshold()
        encoded = {}
        for name, value in outputs.items():
            if keep in (True, "auto") and nbytes(value) > threshold:
                encoded[name] = self.store.put(value).to_wire()
            else:
                encoded[name] = tensor_to_wire(value) if serialize else value
        return encoded

    def stats(self) -> dict[str, Any]:
        """Every replica's counters here, this worker's Triton servers, kept outputs and lanes."""
        return {
            "replicas": {rid: r.get_stats() for rid, r in self.replicas.items()},
            "triton": self.triton.stats(),
            "store": {"tensors": len(self.store), "bytes": self.store.nbytes},
            "triton_restarts": self.triton.restarts,
            "lanes": self.lanes.stats(),
        }

    async def close(self) -> None:
        """The worker is closing (or the plugin was removed): no replica or Triton server outlives it."""
        if self._closed:
            return
        self._closed = True
        for replica in list(self.replicas.values()):
            try:
                await replica.stop(drain_timeout=1)
            except Exception:
                logger.exception("stopping replica %s", replica.replica_id)
        if self._reaper is not None:
            self._reaper.cancel()
        if self._listener is not None:
            self._listener.stop()
        # answers of the drained requests leave first; Dask closes its own comms, the tdask sockets end here
        senders = list(self.streams)
        await asyncio.gather(*(sender.flush() for sender in senders))
        for sender in senders:
            sender.abort()
        await self.lanes.close()
        await self.session.close()
        await self.triton.close()
