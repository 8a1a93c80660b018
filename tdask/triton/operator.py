"""An operator that serves a Triton Core model (``config.pbtxt`` + ``1/model.py``) in a real Triton server."""

from __future__ import annotations

import logging
from typing import Any

from tdask.errors import ConfigError, InvalidRequestError, PlacementError, TdaskError, TritonError
from tdask.operator import Operator, Request
from tdask.triton.model_config import merge_model_config, read_model_config
from tdask.triton.servers import TritonServers

logger = logging.getLogger(__name__)


def check_gpu() -> None:
    """A GPU operator needs a usable GPU here; never fall back to the CPU."""
    try:
        import cupy
    except ImportError as e:
        raise PlacementError("GPU operator on a worker without CuPy: install cupy or use device CPU") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing
        raise PlacementError(f"GPU operator on a worker without a usable GPU: {e}") from e
    if count < 1:
        raise PlacementError("GPU operator on a worker without a usable GPU (0 CUDA devices)")


class TritonCoreOperator(Operator):
    """Loads the model into its worker's Triton server (started on first use) and forwards requests.

    The operator config's ``instances``, ``device`` and ``parameters`` are merged into the
    model's own ``config.pbtxt``, the way the original triton_distributed did.
    """

    serves_triton_model = True

    async def setup(self) -> None:
        cfg = self.config
        servers = self.context.services.get("triton")
        if not isinstance(servers, TritonServers):
            raise ConfigError(f"operator {cfg.name!r}: its worker offers no Triton servers (is tdask's worker "
                              "plugin installed? tdask.Deployment installs it)")
        self.servers = servers
        self._cupy = None
        if cfg.device == "GPU":
            check_gpu()
            import cupy

            self._cupy = cupy
        base = read_model_config(cfg.repository, cfg.name)
        self.model_config = merge_model_config(
            base, name=cfg.name, instance_count=cfg.instances, device=cfg.device, parameters=dict(cfg.parameters)
        )
        self.server = await servers.acquire_model(cfg.repository, cfg.name, self.model_config, instances=cfg.instances)
        self.client = servers.client(self.server)
        self._metadata = await self.client.model_metadata(cfg.name)
        # a decoupled model answers a request with any number of responses: streamed requests only
        policy = (await self.client.model_config(cfg.name)).get("model_transaction_policy") or {}
        self.decoupled = bool(policy.get("decoupled", False))

    async def _current_client(self) -> Any:
        """This worker's Triton server may have been restarted (new ports): follow it."""
        server = await self.servers.current(self.config.repository)
        if server is not self.server:
            self.server = server
            self.client = self.servers.client(server)
        return self.client

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            try:
                client = self.client
                if not self.servers.is_current(self.config.repository, self.server):
                    client = await self._current_client()
                inputs = request.inputs
                if self._cupy is not None:  # the gRPC hop to Triton is staged through host memory
                    inputs = {k: (self._cupy.asnumpy(v) if hasattr(v, "__cuda_array_interface__") else v)
                              for k, v in inputs.items()}
                if self.decoupled:
                    await self._stream(client, request, inputs)
                    continue
                outputs = await client.infer(
                    self.config.name, inputs, parameters=request.parameters,
                    request_id=request.request_id, idempotent=self.config.idempotent,
                )
                outputs = self._placed(outputs)
            except TdaskError as e:
                request.fail(e)
                continue
            except Exception as e:
                request.fail(TritonError(f"{self.config.name}: {e}"))
                continue
            await request.respond(outputs)

    def _placed(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """GPU operators hand device arrays to the next operator."""
        if self._cupy is None:
            return outputs
        return {k: self._cupy.asarray(v) for k, v in outputs.items()}

    async def _stream(self, client: Any, request: Request, inputs: dict[str, Any]) -> None:
        """A decoupled model's responses, passed on one by one as Triton sends them."""
        name = self.config.name
        if not request.streamed:
            raise InvalidRequestError(f"model {name!r} is decoupled (it may send several responses per request): "
                                      "call it with stream(), not infer()")
        responses = client.stream(name, inputs, parameters=request.parameters, request_id=request.request_id)
        try:
            async for outputs, final in responses:
                if outputs is not None:
                    await request.send(self._placed(outputs), final)
                elif final:
                    await request.end()
        finally:
            await responses.aclose()  # before the end (the caller cancelled): cancels the request in Triton

    async def teardown(self) -> None:
        # the client belongs to the worker's server (shared by its models) and closes with it
        if getattr(self, "server", None) is not None:
            await self.servers.release_model(self.config.repository, self.config.name,
                                             instances=self.config.instances)

    def lane(self) -> dict[str, Any] | None:
        """A CPU model's server, for callers on this host that run small requests on it themselves."""
        if self._cupy is not None:  # a GPU operator's tensors stay on the device, in this worker
            return None
        if type(self).execute is not TritonCoreOperator.execute or self.decoupled:  # these run here only
            return None
        server = self.servers.serving(self.config.repository)
        if server is None:
            return None
        return {"http": server.http_url, "grpc": server.grpc_url, "server": server.pid, "model": self.config.name}

    def metadata(self) -> dict[str, Any]:
        """Triton's own metadata of the loaded model."""
        return self._metadata

    def info(self) -> dict[str, Any]:
        server = getattr(self, "server", None)
        if server is None:
            return {}
        server = self.servers.serving(self.config.repository) or server
        return {"triton_pid": server.pid, "triton_grpc": server.grpc_url, "triton_metrics": server.metrics_url}
