"""Deployments that outlive the command that made them: held and supervised inside the scheduler.

``python -m deploy --detach`` registers :class:`DeploymentsPlugin` with the scheduler (once; registering it again
changes nothing) and hands it a named deployment. The plugin runs the same :class:`~tdask.deploy.deployment.Deployment`
as a foreground deploy, on a client of its own inside the scheduler process: the actors of the replicas are that
client's, so they live while the scheduler lives, and its supervisor places lost replicas again with no deploy
process anywhere. ``--list`` and ``--remove`` ask the plugin through the scheduler's handlers below; deploying
a name again replaces that deployment.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol import pickle

from tdask.deploy.deployment import Deployment
from tdask.errors import ConfigError, TdaskError, to_wire

logger = logging.getLogger(__name__)

DEPLOY_HANDLER = "tdask_deploy"  # name, operators (pickled OperatorConfigs) -> {"replicas": [...]} or {"error"}
REMOVE_HANDLER = "tdask_remove"  # name (None: every one) -> {"removed": [names]}
LIST_HANDLER = "tdask_deployments"  # -> {name: [replica infos]}


class DeploymentsPlugin(SchedulerPlugin):
    """Named deployments, held by the scheduler; see the module's docstring."""

    name = "tdask-deployments"
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.deployments: dict[str, Deployment] = {}
        self._client: Client | None = None
        self._lock: asyncio.Lock | None = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._lock = asyncio.Lock()
        scheduler.handlers[DEPLOY_HANDLER] = self.deploy
        scheduler.handlers[REMOVE_HANDLER] = self.remove
        scheduler.handlers[LIST_HANDLER] = self.listing

    async def _own_client(self) -> Client:
        """The client whose actors the deployments' replicas are: it lives in the scheduler's process."""
        if self._client is None or self._client.status in ("closing", "closed"):
            self._client = await Client(self.scheduler.address, asynchronous=True, direct_to_workers=True,
                                        name="tdask-deployments")
        return self._client

    async def deploy(self, name: str, operators: bytes) -> dict[str, Any]:
        """Place ``operators`` as the deployment ``name``, replacing one of that name."""
        try:
            configs = pickle.loads(operators)
            if not isinstance(name, str) or not name:
                raise ConfigError(f"a deployment needs a name, got {name!r}")
            async with self._lock:
                old = self.deployments.pop(name, None)
                if old is not None:
                    logger.info("replacing deployment %s", name)
                    await old.stop()
                deployment = Deployment(await self._own_client(), configs)
                replicas = await deployment.start()
                self.deployments[name] = deployment
            logger.info("deployment %s: %d replicas placed", name, len(replicas))
            return {"replicas": replicas}
        except Exception as e:  # noqa: BLE001 - the command that asked says what went wrong
            if not isinstance(e, TdaskError):
                logger.exception("deployment %s failed", name)
            return {"error": to_wire(e)}

    async def remove(self, name: str | None = None) -> dict[str, Any]:
        """Stop the deployment ``name`` (every one when None): its replicas and the Triton servers started for them."""
        async with self._lock:
            names = [name] if name is not None else list(self.deployments)
            removed = []
            for each in names:
                deployment = self.deployments.pop(each, None)
                if deployment is not None:
                    await deployment.stop()
                    removed.append(each)
        return {"removed": removed}

    def listing(self) -> dict[str, Any]:
        return {name: deployment.replicas for name, deployment in self.deployments.items()}

    async def close(self) -> None:
        """The scheduler is closing: stop what runs (a worker that outlives it then holds no orphan replica)."""
        for name in list(self.deployments):
            try:
                await asyncio.wait_for(self.deployments.pop(name).stop(), 30)
            except Exception as e:  # noqa: BLE001 - the workers may be gone too
                logger.warning("stopping deployment %s: %r", name, e)
        if self._client is not None:
            await self._client.close()
