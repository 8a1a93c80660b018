"""Placing operators' replicas on a Dask cluster as actors, keeping them placed, taking them down."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from distributed import Client
from distributed.comm import CommClosedError

from tdask import config
from tdask.deploy import spec
from tdask.deploy.placement import plan_placement
from tdask.errors import PlacementError, TdaskError
from tdask.operator import OperatorConfig
from tdask.registry import ROOT, operator_key
from tdask.worker.plugin import TdaskWorkerPlugin
from tdask.worker.replica import Replica

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Placed:
    config: OperatorConfig
    future: Any
    actor: Any
    info: dict[str, Any]


class Deployment:
    """A set of operators placed on a cluster; they serve until :meth:`stop`.

    The actor futures held here keep the replicas alive: Dask deletes an actor when its
    future is released, so the deploying process owns the deployment. Dask actors are not
    fault tolerant, so a supervisor notices replicas whose worker is gone, drops them from
    the registry (callers stop routing to them) and places them again as soon as a worker
    with the right resources is there.

    >>> async with Deployment(client, [OperatorConfig("encoder", repository=repo)]) as d:  # doctest: +SKIP
    ...     print(d.replicas)
    """

    def __init__(self, client: Client, operators: Sequence[OperatorConfig], supervise: bool = True) -> None:
        names = [op.name for op in operators]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise TdaskError(f"operators listed twice: {sorted(duplicates)}")
        self.client = client
        self.operators = list(operators)
        self.supervise = supervise
        self._placed: dict[str, _Placed] = {}
        self._supervisor: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.events: list[dict[str, Any]] = []  # replicas lost and placed again, for reports and tests

    @classmethod
    def from_file(cls, client: Client, source: str | os.PathLike | Mapping[str, Any], **kwargs: Any) -> Deployment:
        """The operators a deployment file lists (a path to its YAML, or its contents as a dict): see
        :mod:`tdask.deploy.spec`. Repositories are relative to the file (to the current folder for a dict)."""
        return cls(client, spec.load(source), **kwargs)

    @property
    def replicas(self) -> list[dict[str, Any]]:
        """What each running replica reported when it started (worker, device, Triton pid, ...)."""
        return [p.info for p in self._placed.values()]

    async def _usage(self) -> dict[str, dict[str, int]]:
        usage: dict[str, dict[str, int]] = defaultdict(lambda: {"replicas": 0, "gpus_used": 0})
        for versions in ((await self.client.get_metadata(ROOT, default=None)) or {}).values():
            for record in (versions or {}).values():
                for r in record.get("replicas", []):
                    usage[r["worker"]]["replicas"] += 1
                    if r.get("device") == "GPU":
                        usage[r["worker"]]["gpus_used"] += 1
        return usage

    async def start(self) -> list[dict[str, Any]]:
        """Place every replica, run its setup and record it; all or nothing."""
        await self.client.register_plugin(TdaskWorkerPlugin())  # once per cluster: tdask on every worker
        identity = await self.client.scheduler.identity(n_workers=-1)
        plan = plan_placement(self.operators, identity["workers"], await self._usage())
        try:
            for cfg in self.operators:
                mine = [addr for c, _, addr in plan if c is cfg]
                await asyncio.gather(*(self._start_replica(cfg, addr) for addr in mine))
                await self._register(cfg)
        except BaseException:
            await self.stop()
            raise
        if self.supervise:
            self._supervisor = asyncio.ensure_future(self._supervise())
        return self.replicas

    async def _start_replica(self, cfg: OperatorConfig, address: str) -> dict[str, Any]:
        replica_id = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        future = self.client.submit(
            Replica, cfg, replica_id, actor=True, workers=[address], allow_other_workers=False,
            pure=False, key=f"tdask-replica-{replica_id}",
        )
        try:
            actor = await future
            info = await actor.start()
        except BaseException:
            future.release()
            raise
        self._placed[replica_id] = _Placed(cfg, future, actor, info)
        logger.info("started replica %s of %s on %s", replica_id, cfg.name, address)
        return info

    async def _register(self, cfg: OperatorConfig) -> None:
        """Record the running replicas of ``cfg`` in the scheduler, where callers look them up."""
        versions = (await self.client.get_metadata(operator_key(cfg.name), default=None)) or {}
        replicas = [{"replica": rid, "worker": p.info["worker"], "device": p.info["device"]}
                    for rid, p in self._placed.items() if p.config is cfg]
        if replicas:
            metadata = next(p.info.get("metadata") for p in self._placed.values() if p.config is cfg)
            versions[str(cfg.version)] = {"config": cfg.describe(), "replicas": replicas, "metadata": metadata}
        else:
            versions.pop(str(cfg.version), None)
        await self.client.set_metadata(operator_key(cfg.name), versions)

    # -- supervision ----------------------------------------------------------------------
    async def _supervise(self) -> None:
        unreachable = False
        while True:
            await asyncio.sleep(config.seconds("deployment.supervise-interval"))
            if self.client.status in ("closing", "closed"):
                logger.warning("deployment supervisor: its client is closed (the scheduler is gone?); it stops")
                return
            try:
                await self.check()
                unreachable = False
            except asyncio.CancelledError:
                raise
            except (OSError, CommClosedError) as e:  # said once, not every second
                if not unreachable:
                    logger.warning("deployment supervisor: cannot reach the scheduler (%s)", e)
                unreachable = True
            except Exception:
                logger.exception("deployment supervisor")

    async def check(self) -> None:
        """Drop replicas whose worker is gone; place missing replicas where workers allow."""
        async with self._lock:
            workers = (await self.client.scheduler.identity(n_workers=-1))["workers"]
            changed = set()
            for rid, placed in list(self._placed.items()):
                if placed.info["worker"] not in workers:
                    logger.warning("replica %s of %s was lost with worker %s", rid, placed.config.name,
                                   placed.info["worker"])
                    self.events.append({"event": "lost", "replica": rid, "operator": placed.config.name,
                                        "worker": placed.info["worker"]})
                    del self._placed[rid]
                    placed.future.release()
                    changed.add(placed.config.name)
            for cfg in self.operators:
                if cfg.name in changed:
                    await self._register(cfg)
            for cfg in self.operators:
                missing = cfg.replicas - sum(1 for p in self._placed.values() if p.config is cfg)
                if missing <= 0:
                    continue
                try:
                    plan = plan_placement([dataclasses.replace(cfg, replicas=missing)], workers, await self._usage())
                except PlacementError as e:
                    logger.info("cannot place %d replica(s) of %s yet: %s", missing, cfg.name, e)
                    continue
                for _, _, address in plan:
                    try:
                        info = await self._start_replica(cfg, address)
                    except Exception as e:
                        logger.warning("placing a replica of %s on %s failed: %r", cfg.name, address, e)
                        continue
                    # record the operator's own config, not the copy made for planning
                    self._placed[info["replica"]].config = cfg
                    self.events.append({"event": "placed", "replica": info["replica"], "operator": cfg.name,
                                        "worker": address})
                await self._register(cfg)

    # -- shutdown ---------------------------------------------------------------------------
    async def stop(self) -> None:
        """Unregister, drain and tear down every replica (Triton models and servers too).

        Operators stop in reverse order of deployment, so a pipeline operator drains its
        in-flight requests while the operators it calls still serve.
        """
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None
        async with self._lock:
            for cfg in reversed(self.operators):
                mine = {rid: p for rid, p in self._placed.items() if p.config is cfg}
                for rid in mine:
                    del self._placed[rid]
                try:
                    await self._register(cfg)
                except Exception as e:
                    logger.warning("unregistering %s: %r", cfg.name, e)
                await asyncio.gather(*(self._stop_replica(rid, p) for rid, p in mine.items()))

    async def stop_replica(self, replica_id: str) -> None:
        """Stop one replica (its operator keeps its other replicas); the supervisor, if any, places it again."""
        async with self._lock:
            placed = self._placed.pop(replica_id)
            await self._register(placed.config)
            await self._stop_replica(replica_id, placed)

    async def _stop_replica(self, replica_id: str, placed: _Placed) -> None:
        try:
            await placed.actor.stop()
        except Exception as e:
            logger.warning("stopping replica %s: %r", replica_id, e)
        placed.future.release()

    async def __aenter__(self) -> Deployment:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
