"""The Triton servers of one worker process, shared by the replicas there.

One server per model repository (and server binary), started when the first replica needs it and stopped
with the last model it holds. Replicas of one model on one worker share the loaded model, which runs the
sum of their instances, so N replicas here serve like N elsewhere. A watchdog notices a server that died,
starts a new one and reloads its models; callers wait for it (:meth:`TritonServers.current`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from typing import Any

from tdask import config
from tdask.errors import PlacementError, ReplicaUnavailableError
from tdask.shm import lending
from tdask.shm.lending import IN_PLACE, InPlace
from tdask.triton.client import TritonModelClient
from tdask.triton.server import TritonServer

logger = logging.getLogger(__name__)

Key = tuple[str, "str | None"]  # (model repository, server binary)


def _with_instances(model_config: dict[str, Any], count: int) -> dict[str, Any]:
    groups = model_config.get("instance_group") or [{"kind": "KIND_CPU"}]
    return {**model_config, "instance_group": [{**group, "count": count} for group in groups]}


def _without_instances(model_config: dict[str, Any]) -> dict[str, Any]:
    return _with_instances(model_config, 0)


class TritonServers:
    """The Triton servers of the worker at ``address`` (named ``name`` in log files)."""

    def __init__(self, address: str, name: str) -> None:
        self.address = address
        self.name = name
        self.servers: dict[Key, TritonServer] = {}
        # per server, per model: the instance count each replica here asked for, and the config loaded
        self._models: dict[Key, dict[str, list[int]]] = defaultdict(dict)
        self._configs: dict[Key, dict[str, dict]] = defaultdict(dict)
        self._ready: dict[Key, asyncio.Event] = {}
        self._watchdogs: dict[Key, asyncio.Task] = {}
        # one client (HTTP connections, shared-memory pool) per server, shared by the models it holds
        self._clients: dict[TritonServer, TritonModelClient] = {}
        self.restarts = 0
        self._lock: asyncio.Lock | None = None

    @staticmethod
    def _key(repository: str) -> Key:
        return (repository, config.get("triton.server-path"))

    def _new_server(self, key: Key) -> TritonServer:
        return TritonServer(key[0], server_path=key[1], log_file=self._log_file(),
                            log_verbose=int(config.get("triton.log-verbose")),
                            startup_timeout=config.seconds("triton.startup-timeout"))

    def _log_file(self) -> str | None:
        log_dir = config.get("log-dir")
        if not log_dir:
            return None
        os.makedirs(log_dir, exist_ok=True)
        name = str(self.name).replace("/", "_").replace(":", "_")
        return os.path.join(log_dir, f"triton-{name}.log")

    # -- models --------------------------------------------------------------------------------
    async def acquire_model(self, repository: str, model: str, model_config: dict[str, Any],
                            instances: int = 1) -> TritonServer:
        """Start the server for ``repository`` if needed and load ``model`` in it with ``instances`` more."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        key = self._key(repository)
        async with self._lock:
            server = self.servers.get(key)
            if server is None:
                server = self._new_server(key)
                await server.start()
                self.servers[key] = server
                self._watch(key, server)
                logger.info("Triton server pid %s for %s (gRPC %s)", server.pid, self.address, server.grpc_url)
            counts = self._models[key]
            if model not in counts:
                await server.load_model(model, model_config)
                self._configs[key][model] = model_config
                counts[model] = [instances]
                return server
            loaded = self._configs[key][model]
            if _without_instances(loaded) != _without_instances(model_config):
                raise PlacementError(
                    f"model {model!r} is already loaded in the Triton server of worker {self.address} "
                    "with a different configuration (another version or other parameters); one server holds "
                    "one model of a name: place this operator on another worker (e.g. with resources=...)"
                )
            total = sum(counts[model]) + instances
            summed = _with_instances(loaded, total)
            await server.load_model(model, summed)  # Triton serves the old instances until the new ones are up
            self._configs[key][model] = summed
            counts[model].append(instances)
            logger.info("%s on %s: %d replicas share %d instances", model, self.address, len(counts[model]), total)
            return server

    async def release_model(self, repository: str, model: str, instances: int = 1) -> None:
        """Give back a replica's instances; unload ``model`` with its last replica here, and stop the server
        when it holds no model."""
        key = self._key(repository)
        if self._lock is None:
            return
        async with self._lock:
            counts = self._models.get(key, {})
            server = self.servers.get(key)
            if model in counts:
                counts[model].remove(instances)  # what this replica's acquire added
                if not counts[model]:
                    del counts[model]
                    self._configs[key].pop(model, None)
                    if server is not None and server.is_alive() and counts:
                        await server.unload_model(model)
                else:
                    summed = _with_instances(self._configs[key][model], sum(counts[model]))
                    self._configs[key][model] = summed
                    if server is not None and server.is_alive():
                        try:
                            await server.load_model(model, summed)
                        except Exception:  # the remaining replicas keep the larger instance count
                            logger.exception("reloading %s with %d instances failed", model, sum(counts[model]))
            if server is not None and not counts:
                del self.servers[key]  # first: the watchdog must not restart it
                await self._stop(server)

    # -- the live server -------------------------------------------------------------------------
    async def current(self, repository: str) -> TritonServer:
        """The live server for ``repository``; waits while a crashed one is being restarted."""
        key = self._key(repository)
        ready = self._ready.get(key)
        if ready is not None and not ready.is_set():
            await ready.wait()
        server = self.servers.get(key)
        if server is None:
            raise ReplicaUnavailableError(f"no Triton server for {repository} on worker {self.address}")
        return server

    def is_current(self, repository: str, server: TritonServer) -> bool:
        """Whether ``server`` is the live server for ``repository`` (not one that died or was replaced)."""
        return server.is_alive() and self.servers.get(self._key(repository)) is server

    def serving(self, repository: str) -> TritonServer | None:
        """The server for ``repository`` if it serves now; None while it is down or being restarted."""
        key = self._key(repository)
        ready = self._ready.get(key)
        server = self.servers.get(key)
        if server is None or not server.is_alive() or (ready is not None and not ready.is_set()):
            return None
        return server

    def client(self, server: TritonServer) -> TritonModelClient:
        """The client of ``server`` that every operator here shares: one set of connections, and one
        shared-memory pool, so one model's output can be the next model's input in place."""
        client = self._clients.get(server)
        if client is None:
            client = self._clients[server] = TritonModelClient(server.grpc_url, server.http_url)
        return client

    async def landing(self, nbytes: int, lent: bool = False) -> memoryview | InPlace | None:
        """Where a large frame of a request stream is received on this worker. Lent by another process of this
        host, it is mapped where it lies (``IN_PLACE``): the Triton server reads it from there, or it is lent on.
        Sent through the socket, it lands in a region of this worker's Triton server when it has exactly one
        (a caller's tensor is then the model's input where it arrived), else in the frame pool."""
        if len(self._clients) != 1:
            return IN_PLACE if lending.wanted() else None
        (client,) = self._clients.values()
        if lent and client.reads_lent_frames(nbytes):  # (only peers that share memory lend)
            return IN_PLACE
        try:
            return await client.landing(nbytes)
        except Exception:  # noqa: BLE001 - e.g. the server is restarting: the frame gets a buffer of its own
            logger.debug("no shared-memory region for a %d-byte frame", nbytes, exc_info=True)
            return None

    def clients(self) -> list[TritonModelClient]:
        """The clients of the servers that serve now (one per server)."""
        return list(self._clients.values())

    def stats(self) -> list[dict[str, Any]]:
        """Each server: its process, addresses, and what its client moved through shared memory."""
        out = []
        for server in self.servers.values():
            client = self._clients.get(server)
            out.append({"pid": server.pid, "grpc": server.grpc_url, "metrics": server.metrics_url,
                        "alive": server.is_alive(), "shm": client.stats() if client is not None else {}})
        return out

    # -- restarts ------------------------------------------------------------------------------
    def _watch(self, key: Key, server: TritonServer) -> None:
        self._ready.setdefault(key, asyncio.Event()).set()
        self._watchdogs[key] = asyncio.ensure_future(self._watchdog(key, server))

    async def _watchdog(self, key: Key, server: TritonServer) -> None:
        """Notice a Triton server that died under us, start a new one and reload its models."""
        await server.wait()
        if self.servers.get(key) is not server:
            return  # stopped on purpose
        logger.error("Triton server pid %s of worker %s exited (code %s); restarting it and reloading %s",
                     server.pid, self.address, server.returncode, sorted(self._configs[key]))
        self.restarts += 1
        ready = self._ready[key]
        ready.clear()
        delay = config.seconds("triton.restart-delay")
        try:
            while self.servers.get(key) is server:
                async with self._lock:
                    if self.servers.get(key) is not server:
                        return
                    await self._stop(server)
                    fresh = self._new_server(key)
                    try:
                        await fresh.start()
                        for model, model_config in self._configs[key].items():
                            if model in self._models.get(key, {}):
                                await fresh.load_model(model, model_config)
                    except Exception as e:
                        await fresh.stop()
                        logger.error("restarting Triton on %s failed (%r); trying again in %.1f s", self.address, e,
                                     delay)
                    else:
                        self.servers[key] = fresh
                        self._watch(key, fresh)
                        logger.warning("Triton server restarted on %s: pid %s (gRPC %s)", self.address, fresh.pid,
                                       fresh.grpc_url)
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, config.seconds("triton.restart-delay-max"))
        finally:
            ready.set()

    async def _stop(self, server: TritonServer) -> None:
        client = self._clients.pop(server, None)
        if client is not None:
            await client.close()
        await server.stop()

    async def close(self) -> None:
        """Stop every server (the worker is closing): no Triton server outlives its worker."""
        servers = list(self.servers.values())
        self.servers.clear()
        for task in self._watchdogs.values():
            task.cancel()
        for server in servers:
            await self._stop(server)
