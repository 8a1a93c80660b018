"""A front door: the KServe v2 HTTP and gRPC servers over one session of the cluster. Any number of them may
serve one deployment (each finds every operator in the scheduler's registry); losing one leaves the others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from distributed.comm.addressing import unparse_host_port

from tdask import config
from tdask.errors import ConfigError
from tdask.frontdoor.core import FrontDoorCore
from tdask.frontdoor.grpc import GrpcFrontDoor
from tdask.frontdoor.http import HttpFrontDoor
from tdask.registry import FRONTDOORS
from tdask.session import Session

logger = logging.getLogger("tdask.frontdoor")

# room for the protocols' own framing and JSON beside a request's tensors
_BODY_SLACK = 1 << 20


def _listening_socket(host: str, port: int, what: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"the front door cannot listen on {host}:{port} ({what}): {e.strerror or e}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class FrontDoor:
    """KServe v2 over HTTP (``http_port``) and gRPC (``grpc_port``) on ``host``; port 0 takes a free one.

    >>> door = FrontDoor(session, http_port=0, grpc_port=0)  # doctest: +SKIP
    >>> await door.start(); print(door.http_url, door.grpc_address)  # doctest: +SKIP
    """

    def __init__(self, session: Session, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, close_session: bool = False,
                 set_metadata: Callable[[list[str], Any], Awaitable[Any]] | None = None) -> None:
        """``close_session``: the front door owns ``session`` and closes it with itself. ``set_metadata(keys,
        value)``: how it reaches the scheduler's metadata (default: the session's client; a front door with
        neither publishes nothing)."""
        self.core = FrontDoorCore(session)
        if set_metadata is None and session.client is not None:
            set_metadata = session.client.set_metadata
        self._set_metadata = set_metadata
        self._close_session = close_session
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        limit = self.core.max_request_bytes + _BODY_SLACK
        self._http = HttpFrontDoor(self.core, max_body_bytes=limit)
        self._grpc_limit = limit
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self._publishing: asyncio.Task | None = None
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    @property
    def http_url(self) -> str:
        return f"http://{unparse_host_port(self.host, self.http_port)}"

    @property
    def grpc_address(self) -> str:
        return unparse_host_port(self.host, self.grpc_port)

    async def start(self) -> FrontDoor:
        sock = _listening_socket(self.host, self.http_port, "--http-port")
        self.http_port = sock.getsockname()[1]
        try:
            self._runner = web.AppRunner(self._http.app, access_log=None, handle_signals=False)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            self._grpc = grpc.aio.server(options=[
                ("grpc.max_receive_message_length", self._grpc_limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ])
            self._grpc.add_generic_rpc_handlers((GrpcFrontDoor(self.core).handler(),))
            reason = "address in use?"
            try:  # grpcio raises, or (older releases) answers port 0, when it cannot bind
                port = self._grpc.add_insecure_port(self.grpc_address)
            except RuntimeError as e:
                port, reason = 0, str(e)
            if port == 0:
                raise ConfigError(f"the front door cannot listen on {self.grpc_address} (--grpc-port): {reason}")
            self.grpc_port = port
            await self._grpc.start()
        except BaseException:
            await self.close()
            raise
        logger.info("front door listening: HTTP %s, gRPC %s", self.http_url, self.grpc_address)
        if self._set_metadata is not None:
            self._publishing = asyncio.ensure_future(self._publish())
        return self

    async def _publish(self) -> None:
        """Its addresses and counts in the scheduler's metadata every second, for the dashboard (an entry not
        renewed for a while is a front door gone)."""
        key = [*FRONTDOORS, self.id]
        while True:
            try:
                await self._set_metadata(key, {"http": self.http_url, "grpc": self.grpc_address, "time": time.time(),
                                                **self.core.summary()})
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the scheduler is away: try again next round
                logger.debug("front door: cannot publish its counts: %r", e)
            await asyncio.sleep(config.seconds("dashboard.poll-interval"))

    async def close(self, grace: float = 1.0) -> None:
        """Stop taking requests; those in flight get ``grace`` seconds to finish."""
        if self._publishing is not None:
            self._publishing.cancel()
            self._publishing = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._set_metadata([*FRONTDOORS, self.id], None), 5)
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._close_session:
            self._close_session = False
            await self.core.session.close()

    async def __aenter__(self) -> FrontDoor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
