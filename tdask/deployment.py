"""Placing operators' replicas on a Dask cluster as actors, and taking them down again."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from distributed import Client

from tdask.errors import TdaskError
from tdask.operator import OperatorConfig
from tdask.placement import plan_placement
from tdask.registry import ROOT, operator_key
from tdask.replica import Replica

logger = logging.getLogger(__name__)


class Deployment:
    """A set of operators placed on a cluster; they serve until :meth:`stop`.

    The actor futures held here keep the replicas alive: Dask deletes an actor when
    its future is released, so the deploying process owns the deployment.

    >>> async with Deployment(client, [OperatorConfig("encoder", repository=repo)]) as d:  # doctest: +SKIP
    ...     print(d.replicas)
    """

    def __init__(self, client: Client, operators: Sequence[OperatorConfig]) -> None:
        names = [op.name for op in operators]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise TdaskError(f"operators listed twice: {sorted(duplicates)}")
        self.client = client
        self.operators = list(operators)
        self.replicas: list[dict[str, Any]] = []
        self._actors: dict[str, tuple[Any, Any]] = {}  # replica id -> (future, actor)

    async def _existing_usage(self) -> dict[str, dict[str, int]]:
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
        identity = await self.client.scheduler.identity(n_workers=-1)
        plan = plan_placement(self.operators, identity["workers"], await self._existing_usage())
        try:
            for cfg in self.operators:
                mine = [(index, addr) for c, index, addr in plan if c is cfg]
                infos = await asyncio.gather(*(self._start_replica(cfg, addr) for _, addr in mine))
                self.replicas.extend(infos)
                await self._register(cfg, infos)
        except BaseException:
            await self.stop()
            raise
        return self.replicas

    async def _start_replica(self, cfg: OperatorConfig, address: str) -> dict[str, Any]:
        replica_id = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        future = self.client.submit(
            Replica, cfg, replica_id, actor=True, workers=[address], allow_other_workers=False,
            pure=False, key=f"tdask-replica-{replica_id}",
        )
        actor = await future
        self._actors[replica_id] = (future, actor)
        info = await actor.start()
        logger.info("started %s", info)
        return info

    async def _register(self, cfg: OperatorConfig, infos: list[dict[str, Any]]) -> None:
        versions = (await self.client.get_metadata(operator_key(cfg.name), default=None)) or {}
        versions[str(cfg.version)] = {
            "config": cfg.describe(),
            "replicas": [{"replica": i["replica"], "worker": i["worker"], "device": i["device"]} for i in infos],
        }
        await self.client.set_metadata(operator_key(cfg.name), versions)

    async def _unregister(self, cfg: OperatorConfig) -> None:
        versions = (await self.client.get_metadata(operator_key(cfg.name), default=None)) or {}
        record = versions.get(str(cfg.version))
        if record is None:
            return
        record["replicas"] = [r for r in record["replicas"] if r["replica"] not in self._actors]
        if not record["replicas"]:
            del versions[str(cfg.version)]
        await self.client.set_metadata(operator_key(cfg.name), versions)

    async def stop(self) -> None:
        """Unregister, drain and tear down every replica (Triton models and servers too)."""
        for cfg in self.operators:
            try:
                await self._unregister(cfg)
            except Exception:
                logger.exception("unregistering %s", cfg.name)
        actors, self._actors = self._actors, {}

        async def stop_one(replica_id: str, actor: Any) -> None:
            try:
                await actor.stop()
            except Exception as e:
                logger.warning("stopping replica %s: %r", replica_id, e)

        await asyncio.gather(*(stop_one(rid, actor) for rid, (_, actor) in actors.items()))
        for future, _ in actors.values():
            future.release()
        self.replicas = []

    async def __aenter__(self) -> Deployment:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
