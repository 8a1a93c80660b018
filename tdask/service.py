"""tdask's per-worker-process service: request streams, kept outputs and Triton servers."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from distributed.comm import CommClosedError, get_address_host
from distributed.core import Status
from distributed.protocol import to_serialize

from tdask import config, shm_frames
from tdask.connection import error_from_wire, read_messages
from tdask.errors import InvalidRequestError, PlacementError, ReplicaUnavailableError, TdaskError
from tdask.socket_comm import IN_PLACE, InPlace, SocketListener, socket_stream_wanted
from tdask.store import OutputStore
from tdask.tensors import TensorRef, from_wire, inline_threshold, is_array, nbytes, to_wire
from tdask.writer import CoalescingWriter

if TYPE_CHECKING:
    from tdask.replica import Replica
    from tdask.triton_client import TritonModelClient
    from tdask.triton_server import TritonServer

logger = logging.getLogger(__name__)

_lock = threading.Lock()

# Errors the caller may retry elsewhere, as long as the request never started executing.
RETRYABLE = ("OverloadedError", "ReplicaUnavailableError")


class _StreamEnded(Exception):
    """The caller closed its request stream."""


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """``retryable``: the replica refused the request before running it (overloaded, not running),
    so another replica may take it. The same errors raised *while* it ran (an operator's own
    call to another operator failed) are not: retrying could run the request twice."""
    name = type(exc).__name__ if isinstance(exc, TdaskError) else "OperatorError"
    message = str(exc) if isinstance(exc, TdaskError) else f"{type(exc).__name__}: {exc}"
    return {"type": name, "message": message,
            "retryable": name in RETRYABLE and not getattr(exc, "started", False)}


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


def _with_instances(model_config: dict[str, Any], count: int) -> dict[str, Any]:
    groups = model_config.get("instance_group") or [{"kind": "KIND_CPU"}]
    return {**model_config, "instance_group": [{**group, "count": count} for group in groups]}


def _without_instances(model_config: dict[str, Any]) -> dict[str, Any]:
    return _with_instances(model_config, 0)


class WorkerService:
    """Installed once per worker as ``worker.extensions["tdask"]``.

    It adds two comm handlers to the worker: ``tdask_stream`` (a long-lived, batched,
    multiplexed request stream per caller, which also carries other workers' fetches of kept
    outputs) and ``tdask_fetch`` (a caller's fetch of a kept output), and owns the Triton servers
    that this worker's replicas share.
    """

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.replicas: dict[str, Replica] = {}
        self.store = OutputStore(worker.address)
        self.triton_servers: dict[tuple[str, str | None], TritonServer] = {}
        # per server, per model: the instance count each replica here asked for
        self.triton_models: dict[tuple[str, str | None], dict[str, list[int]]] = defaultdict(dict)
        self.triton_model_configs: dict[tuple[str, str | None], dict[str, dict]] = defaultdict(dict)
        self._triton_ready: dict[tuple[str, str | None], asyncio.Event] = {}
        self._watchdogs: dict[tuple[str, str | None], asyncio.Task] = {}
        # one client (HTTP connections, shared-memory pool) per server, shared by the models it holds
        self._triton_clients: dict[TritonServer, TritonModelClient] = {}
        self.triton_restarts = 0
        self._triton_lock: asyncio.Lock | None = None
        self.streams: set[CoalescingWriter] = set()  # one per caller's request stream
        self._reaper: asyncio.Task | None = None
        self._socket_listener: SocketListener | None = None
        worker.handlers["tdask_stream"] = self.handle_stream
        worker.handlers["tdask_stream_socket"] = self.handle_stream_socket
        worker.handlers["tdask_fetch"] = self.handle_fetch
        worker.handlers["tdask_stats"] = self.handle_stats

    @classmethod
    def of(cls, worker: Any) -> WorkerService:
        with _lock:
            service = worker.extensions.get("tdask")
            if service is None:
                service = worker.extensions["tdask"] = cls(worker)
            return service

    # -- replicas --------------------------------------------------------------------
    def add_replica(self, replica: Replica) -> None:
        self.replicas[replica.replica_id] = replica
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap_orphans())

    async def _reap_orphans(self, interval: float = 2.0) -> None:
        """Stop replicas whose actor Dask has released (their deployer went away without
        stopping them, e.g. ``python -m deploy`` was SIGKILLed), so their Triton models and
        servers do not outlive the deployment on workers the user keeps running."""
        while True:
            await asyncio.sleep(interval)
            live = {id(a) for a in self.worker.state.actors.values()}
            for rid, replica in list(self.replicas.items()):
                if id(replica) not in live:
                    logger.warning("replica %s of %s was released by its deployer; stopping it", rid,
                                   replica.config.name)
                    try:
                        await replica.stop(drain_timeout=5)
                    except Exception:
                        logger.exception("stopping orphaned replica %s", rid)

    def free_replica(self, candidates: list[str], exclude: set[str]) -> str | None:
        """The least busy of ``candidates`` running here with a free in-flight slot, if any."""
        best, best_load = None, None
        for rid in candidates:
            replica = self.replicas.get(rid)
            if replica is None or rid in exclude:
                continue
            load = replica.load()
            if load is not None and load < replica.config.max_inflight and (best_load is None or load < best_load):
                best, best_load = rid, load
        return best

    def remove_replica(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    # -- the request stream ----------------------------------------------------------
    async def handle_stream(self, comm: Any, **kwargs: Any) -> Status:
        sender = CoalescingWriter(comm)
        self.streams.add(sender)
        tasks: set[asyncio.Task] = set()

        def dispatch(msg: dict[str, Any]) -> None:
            op = msg.get("op")
            if op == "infer":
                task = asyncio.ensure_future(self._serve(msg, sender))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif op == "fetch":
                sender.send(self._fetched(msg))
            elif op == "release":
                self.store.release(msg.get("keys", []))
            elif op in ("lease", "lease-return", "lease-report"):
                self._lanes(op, msg, sender)
            elif op == "close-stream":
                raise _StreamEnded
            else:
                logger.warning("tdask stream: unknown op %r from %s", op, comm.peer_address)

        try:
            await read_messages(comm, dispatch)
        except (CommClosedError, _StreamEnded):
            pass
        finally:
            self.streams.discard(sender)
            for replica in self.replicas.values():
                replica.drop_holder(sender)
            sender.abort()
        return Status.dont_reply

    def _lanes(self, op: str, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        """A caller's lane (:mod:`tdask.lanes`) asks this worker's replica for slots, returns them, or reports
        the requests it ran on them."""
        replica = self.replicas.get(msg.get("replica"))
        if op == "lease":
            reply = replica.lease(sender, int(msg.get("slots", 1))) if replica is not None else {"granted": 0}
            sender.send({**reply, "id": msg.get("id")})
        elif replica is not None:
            if op == "lease-return":
                replica.give_back(sender, int(msg.get("slots", 0)), msg.get("report"))
            else:
                replica.take_report(msg.get("report") or {})

    def _fetched(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Kept tensors asked for by another worker, answered on the stream it already has to this one
        (which lands them where its Triton reads them: an output kept here is the next model's input there
        without a copy)."""
        try:
            keys = msg.get("keys")
            if not isinstance(keys, (list, tuple)) or not all(isinstance(key, str) for key in keys):
                raise InvalidRequestError(f"a fetch names its tensors by a list of keys, got {keys!r:.100}")
            reply: dict[str, Any] = {"tensors": {key: to_serialize(self.store.get(key)) for key in keys}}
        except TdaskError as e:
            reply = {"error": error_to_wire(e)}
        reply["id"] = msg.get("id")
        return reply

    def handle_stream_socket(self) -> dict[str, int | None]:
        """The port of this worker's plain-socket request stream (opened on first ask); None: Dask comms only."""
        if not socket_stream_wanted(self.worker.address):
            return {"port": None}
        if self._socket_listener is None:
            host, port = get_address_host(self.worker.address), int(config.get("transfer.request-stream-port"))
            try:
                self._socket_listener = SocketListener(host, port, self.handle_stream, self.landing)
            except OSError as e:
                raise OSError(f"cannot listen on {host}:{port} for request streams ({e}); set "
                              "tdask.transfer.request-stream-port to a free port, or tdask.transfer.request-stream "
                              "to 'dask' to take requests on the worker's Dask comms") from e
            logger.info("request streams on tcp://%s", self._socket_listener.address)
        return {"port": self._socket_listener.port}

    async def landing(self, nbytes: int, lent: bool = False) -> memoryview | InPlace | None:
        """Where a large frame of a request stream is received. Lent by another process of this host, it is
        mapped where it lies (``IN_PLACE``): this worker's Triton server reads it from there, or it is lent on
        to the next worker or back to the caller. Sent through the socket, it lands in a region of this
        worker's Triton server when it has exactly one (a caller's tensor is then the model's input where
        it arrived), else in the frame pool, from where it can be lent on."""
        if len(self._triton_clients) != 1:
            return IN_PLACE if shm_frames.wanted() else None
        (client,) = self._triton_clients.values()
        if lent and client.reads_lent_frames(nbytes):  # (only peers that share memory lend)
            return IN_PLACE
        try:
            return await client.landing(nbytes)
        except Exception:  # noqa: BLE001 - e.g. the server is restarting: the frame gets a buffer of its own
            logger.debug("no shared-memory region for a %d-byte frame", nbytes, exc_info=True)
            return None

    async def _answer(self, msg: dict[str, Any], serialize: bool) -> dict[str, Any]:
        """Run one request on its replica: outputs or an error, never nothing."""
        try:
            replica = self.replicas.get(msg.get("replica"))
            if replica is None:
                raise ReplicaUnavailableError(
                    f"replica {msg.get('replica')} is not running on worker {self.worker.address}"
                )
            outputs = await replica.handle(msg.get("request_id", ""), msg.get("inputs") or {},
                                           msg.get("parameters") or {})
            outputs = place_outputs(outputs, msg.get("output_device"))
            return {"outputs": self.encode_outputs(outputs, msg.get("keep", False), serialize)}
        except Exception as e:
            if not isinstance(e, TdaskError):
                logger.exception("request %s failed", msg.get("request_id"))
            return {"error": error_to_wire(e)}

    async def _serve(self, msg: dict[str, Any], sender: CoalescingWriter) -> None:
        try:
            reply = await self._answer(msg, serialize=True)
        except asyncio.CancelledError:
            cancelled = ReplicaUnavailableError("request cancelled (its worker is closing); it may or may not have run")
            cancelled.started = True
            reply = {"error": error_to_wire(cancelled)}
        reply["id"] = msg["id"]
        try:
            sender.send(reply)
        except CommClosedError:
            logger.info("caller went away before request %s was answered", msg.get("request_id"))

    async def call_local(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A request from an operator in this same process: no comm, no (de)serialization."""
        return await self._answer(msg, serialize=False)

    def encode_outputs(self, outputs: dict[str, Any], keep: bool | str, serialize: bool = True) -> dict[str, Any]:
        threshold = inline_threshold()
        encoded = {}
        for name, value in outputs.items():
            # kept on this worker when asked and large; small outputs always travel with the answer
            if keep in (True, "auto") and nbytes(value) > threshold:
                encoded[name] = self.store.put(value).to_wire()
            else:
                encoded[name] = to_wire(value) if serialize else value
        return encoded

    def handle_stats(self) -> dict[str, Any]:
        """Every replica's counters here, plus this worker's Triton servers (dashboard, /metrics)."""
        session = getattr(self.worker, "_tdask_session", None)  # the worker's own calls (tdask.remote)
        lanes = session.lanes if session is not None else None
        return {
            "replicas": {rid: r.get_stats() for rid, r in self.replicas.items()},
            "triton": [
                {"pid": s.pid, "grpc": s.grpc_url, "metrics": s.metrics_url, "alive": s.is_alive()}
                for s in self.triton_servers.values()
            ],
            "store": {"tensors": len(self.store), "bytes": self.store.nbytes},
            "triton_restarts": self.triton_restarts,
            "lanes": lanes.stats() if lanes is not None else {},
        }

    # -- kept outputs ----------------------------------------------------------------
    async def handle_fetch(self, keys: list[str], release: bool = False) -> dict[str, Any]:
        values = {key: self.store.get(key) for key in keys}
        if release:
            self.store.release(keys)
        return {key: to_serialize(value) for key, value in values.items()}

    async def resolve_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Replace references by tensors, fetched straight from the worker that holds them."""
        remote: dict[str, list[tuple[str, str]]] = defaultdict(list)
        refs: dict[str, TensorRef] = {}
        resolved = {}
        for name, value in inputs.items():
            value = from_wire(value)
            if isinstance(value, TensorRef):
                refs[name] = value
                if value.worker == self.worker.address:
                    resolved[name] = self.store.get(value.key)
                else:
                    remote[value.worker].append((name, value.key))
            elif is_array(value):
                resolved[name] = value
            else:
                raise InvalidRequestError(f"input {name!r} is not a tensor ({type(value).__name__})")
        for address, wanted in remote.items():
            got = await self._fetch(address, [key for _, key in wanted])
            for name, key in wanted:
                resolved[name] = got[key]
        for name, ref in refs.items():
            value = resolved[name]
            if tuple(value.shape) != tuple(ref.shape) or str(value.dtype) != ref.dtype:
                raise InvalidRequestError(
                    f"input {name!r}: the tensor referenced declares shape {tuple(ref.shape)} {ref.dtype}, "
                    f"but holds {tuple(value.shape)} {value.dtype}"
                )
        return resolved

    async def _fetch(self, address: str, keys: list[str]) -> dict[str, Any]:
        """Tensors kept on worker ``address``, on this worker's request stream to it."""
        from tdask.remote import worker_session

        try:
            reply = await worker_session(self.worker).pool.get(address).call({"op": "fetch", "keys": keys})
        except ReplicaUnavailableError as e:
            raise ReplicaUnavailableError(f"cannot fetch kept tensors from worker {address}: {e}") from e
        if "error" in reply:
            raise error_from_wire(reply["error"])
        return reply["tensors"]

    # -- Triton servers ----------------------------------------------------------------
    def _triton_key(self, repository: str) -> tuple[str, str | None]:
        return (repository, config.get("triton.server-path"))

    def _new_triton_server(self, repository: str, server_path: str | None) -> TritonServer:
        from tdask.triton_server import TritonServer

        return TritonServer(
            repository,
            server_path=server_path,
            log_file=self._triton_log_file(),
            log_verbose=int(config.get("triton.log-verbose")),
            startup_timeout=config.seconds("triton.startup-timeout"),
        )

    async def acquire_triton_model(self, repository: str, model: str, model_config: dict[str, Any],
                                   instances: int = 1) -> TritonServer:
        """Start this worker's Triton server if needed and load ``model`` in it.

        Replicas of one model on one worker share the loaded model, which runs the sum of their
        instances (it is reloaded with the new count), so N replicas here serve like N elsewhere.
        """
        if self._triton_lock is None:
            self._triton_lock = asyncio.Lock()
        key = self._triton_key(repository)
        async with self._triton_lock:
            server = self.triton_servers.get(key)
            if server is None:
                server = self._new_triton_server(repository, key[1])
                await server.start()
                self.triton_servers[key] = server
                self._watch(key, server)
                logger.info("Triton server pid %s for %s (gRPC %s)", server.pid, self.worker.address, server.grpc_url)
            counts = self.triton_models[key]
            if model not in counts:
                await server.load_model(model, model_config)
                self.triton_model_configs[key][model] = model_config
                counts[model] = [instances]
                return server
            loaded = self.triton_model_configs[key][model]
            if _without_instances(loaded) != _without_instances(model_config):
                raise PlacementError(
                    f"model {model!r} is already loaded in the Triton server of worker {self.worker.address} "
                    "with a different configuration (another version or other parameters); one server holds "
                    "one model of a name: place this operator on another worker (e.g. with resources=...)"
                )
            total = sum(counts[model]) + instances
            summed = _with_instances(loaded, total)
            await server.load_model(model, summed)  # Triton serves the old instances until the new ones are up
            self.triton_model_configs[key][model] = summed
            counts[model].append(instances)
            logger.info("%s on %s: %d replicas share %d instances", model, self.worker.address, len(counts[model]),
                        total)
            return server

    async def triton_server(self, repository: str) -> TritonServer:
        """The live server for ``repository``; waits while a crashed one is being restarted."""
        key = self._triton_key(repository)
        ready = self._triton_ready.get(key)
        if ready is not None and not ready.is_set():
            await ready.wait()
        server = self.triton_servers.get(key)
        if server is None:
            raise ReplicaUnavailableError(f"no Triton server for {repository} on worker {self.worker.address}")
        return server

    def serving_triton_server(self, repository: str) -> TritonServer | None:
        """The server for ``repository`` if it serves now; None while it is down or being restarted."""
        key = self._triton_key(repository)
        ready = self._triton_ready.get(key)
        server = self.triton_servers.get(key)
        if server is None or not server.is_alive() or (ready is not None and not ready.is_set()):
            return None
        return server

    def triton_client(self, server: TritonServer) -> TritonModelClient:
        """The client of ``server`` that every operator here shares: one set of connections, and one
        shared-memory pool, so one model's output can be the next model's input in place."""
        from tdask.triton_client import TritonModelClient

        client = self._triton_clients.get(server)
        if client is None:
            client = self._triton_clients[server] = TritonModelClient(server.grpc_url, server.http_url)
        return client

    async def _stop_triton_server(self, server: TritonServer) -> None:
        client = self._triton_clients.pop(server, None)
        if client is not None:
            await client.close()
        await server.stop()

    def _watch(self, key: tuple[str, str | None], server: TritonServer) -> None:
        self._triton_ready.setdefault(key, asyncio.Event()).set()
        task = asyncio.ensure_future(self._watchdog(key, server))
        self._watchdogs[key] = task

    async def _watchdog(self, key: tuple[str, str | None], server: TritonServer) -> None:
        """Notice a Triton server that died under us, start a new one and reload its models."""
        await server.wait()
        if self.triton_servers.get(key) is not server:
            return  # stopped on purpose
        logger.error("Triton server pid %s of worker %s exited (code %s); restarting it and reloading %s",
                     server.pid, self.worker.address, server.returncode, sorted(self.triton_model_configs[key]))
        self.triton_restarts += 1
        ready = self._triton_ready[key]
        ready.clear()
        delay = 0.5
        try:
            while self.triton_servers.get(key) is server:
                async with self._triton_lock:
                    if self.triton_servers.get(key) is not server:
                        return
                    await self._stop_triton_server(server)
                    fresh = self._new_triton_server(key[0], key[1])
                    try:
                        await fresh.start()
                        for model, model_config in self.triton_model_configs[key].items():
                            if model in self.triton_models.get(key, {}):
                                await fresh.load_model(model, model_config)
                    except Exception as e:
                        await fresh.stop()
                        logger.error("restarting Triton on %s failed (%r); trying again in %.1f s",
                                     self.worker.address, e, delay)
                    else:
                        self.triton_servers[key] = fresh
                        self._watch(key, fresh)
                        logger.warning("Triton server restarted on %s: pid %s (gRPC %s)", self.worker.address,
                                       fresh.pid, fresh.grpc_url)
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        finally:
            ready.set()

    async def release_triton_model(self, repository: str, model: str, instances: int = 1) -> None:
        """Give back a replica's instances; unload ``model`` with its last replica here, and stop
        the server when it holds no model."""
        key = self._triton_key(repository)
        async with self._triton_lock:
            counts = self.triton_models.get(key, {})
            server = self.triton_servers.get(key)
            if model in counts:
                counts[model].remove(instances)  # what this replica's acquire added
                if not counts[model]:
                    del counts[model]
                    self.triton_model_configs[key].pop(model, None)
                    if server is not None and server.is_alive() and counts:
                        await server.unload_model(model)
                else:
                    summed = _with_instances(self.triton_model_configs[key][model], sum(counts[model]))
                    self.triton_model_configs[key][model] = summed
                    if server is not None and server.is_alive():
                        try:
                            await server.load_model(model, summed)
                        except Exception:  # the remaining replicas keep the larger instance count
                            logger.exception("reloading %s with %d instances failed", model, sum(counts[model]))
            if server is not None and not counts:
                del self.triton_servers[key]  # first: the watchdog must not restart it
                await self._stop_triton_server(server)

    def _triton_log_file(self) -> str | None:
        import os

        log_dir = config.get("log-dir", None)
        if not log_dir:
            return None
        os.makedirs(log_dir, exist_ok=True)
        name = str(self.worker.name).replace("/", "_").replace(":", "_")
        return os.path.join(log_dir, f"triton-{name}.log")

    async def close(self) -> None:
        """Called by Dask when the worker closes: no Triton server outlives its worker."""
        for replica in list(self.replicas.values()):
            try:
                await replica.stop(drain_timeout=1)
            except Exception:
                logger.exception("stopping replica %s", replica.replica_id)
        if self._reaper is not None:
            self._reaper.cancel()
        if self._socket_listener is not None:
            self._socket_listener.close()
        # answers of the drained requests leave first; Dask closes its own comms, the plain-socket ones end here
        senders = list(self.streams)
        await asyncio.gather(*(sender.flush() for sender in senders))
        for sender in senders:
            sender.abort()
        servers = list(self.triton_servers.values())
        self.triton_servers.clear()
        for task in self._watchdogs.values():
            task.cancel()
        for server in servers:
            await self._stop_triton_server(server)
