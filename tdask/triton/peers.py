"""Other processes' shared-memory regions registered with one Triton server.

A large tensor that another process of this host lent to a worker with a Triton server is mapped there
where it lies (:class:`tdask.shm.mappings.Borrowed`) instead of copied into one of the server's own regions.
Registered with the server too, the lender's region is then the model's input in place: a caller's 8 MB
tensor, or an output fetched from the worker that produced it, costs the worker no copy at all.

Registrations are kept while the lender's region exists, since regions are reused; one whose region
is gone (its owner removed it or died) is unregistered once no call uses it (the one sweep of removed
regions, :meth:`tdask.shm.mappings.Mappings.sweep`, tells it which), at most
``tdask.triton.peer-regions-bytes`` are registered (the least recently used unused ones go first), and a
region the server cannot register is copied as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

from tdask import config
from tdask.shm import lending
from tdask.shm.mappings import Borrowed, mappings

logger = logging.getLogger(__name__)


class _Peer:
    def __init__(self, name: str, size: int) -> None:
        self.name = name  # the lender's region
        self.registered_as = f"peer_{name}"  # never one of this server's own regions' names
        self.size = size
        self.users = 0  # calls in progress that read it
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()


class PeerRegions:
    """The lenders' regions that one Triton server reads tensors from where they lie."""

    def __init__(self, client: Any) -> None:
        self.client = client  # the server's tritonclient.grpc.aio client
        self.bytes = 0
        self._peers: OrderedDict[str, _Peer] = OrderedDict()  # least recently used first
        self._refused: set[str] = set()  # regions the server could not register: their tensors are copied
        self._sweeping: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.get_running_loop()
        self.closed = False

    async def use(self, array: np.ndarray) -> tuple[_Peer, int] | None:
        """The registration under which the server reads ``array`` where it lies, and its offset there; the
        registration is kept until :meth:`done`. None when ``array`` lies in no lent region (or in one
        written here, or one the server cannot register)."""
        if self.closed or not array.flags.c_contiguous:
            return None
        found = lending.find(array.data, Borrowed)
        if found is None or found[0].name in self._refused:
            return None
        borrowed, offset = found
        peer = self._peers.get(borrowed.name)
        if peer is None:
            peer = await self._register(borrowed.name)
        else:
            self._peers.move_to_end(peer.name)
            if not peer.ready.done() and not await asyncio.shield(peer.ready):
                return None
        if peer is None or self.closed or self._peers.get(peer.name) is not peer:  # gone while registering
            return None
        peer.users += 1
        return peer, offset

    def done(self, peer: _Peer) -> None:
        peer.users -= 1
        if self._sweeping is None and not self.closed:
            self._sweeping = asyncio.get_running_loop().call_later(config.seconds("transfer.sweep-interval"),
                                                                   self._sweep)

    async def _register(self, name: str) -> _Peer | None:
        try:
            size = mappings.size(name)
        except (OSError, ValueError):
            return None
        limit = int(config.get("triton.peer-regions-bytes") or 0)
        self._evict(limit - size)
        if self.bytes + size > limit:
            return None  # every registered region is in use: this one is copied
        peer = self._peers[name] = _Peer(name, size)
        self.bytes += size
        mappings.listen(self)
        try:
            await self.client.register_system_shared_memory(peer.registered_as, f"/{name}", size)
        except Exception as e:  # noqa: BLE001 - e.g. the server cannot open it: its tensors are copied
            logger.info("Triton cannot read the shared-memory region %s where it lies (%s): its tensors are "
                        "copied into the server's own regions", name, e)
            self._refused.add(name)
            self._forget(peer)
            peer.ready.set_result(False)
            return None
        peer.ready.set_result(True)
        return peer

    def _evict(self, room: int) -> None:
        """Unregister unused regions, least recently used first, until at most ``room`` bytes stay."""
        for peer in list(self._peers.values()):
            if self.bytes <= room:
                break
            if peer.users == 0 and peer.ready.done():
                self._unregister(peer)

    def _sweep(self) -> None:
        """While regions are registered, the sweep runs every ``tdask.transfer.sweep-interval``."""
        self._sweeping = None
        if self.closed:
            return
        mappings.sweep()
        if self._peers:
            self._sweeping = asyncio.get_running_loop().call_later(config.seconds("transfer.sweep-interval"),
                                                                   self._sweep)

    def held(self) -> Iterable[str]:
        """The lenders' regions registered with the server (told by the sweep when their owner removed them)."""
        return list(self._peers)

    def removed(self, names: set[str]) -> None:
        """Unregister the unused ones of ``names``, whose owner removed them: the server's mapping would keep
        their memory (one still in use goes at a later sweep). The sweep may run on another loop's thread."""
        try:
            self._loop.call_soon_threadsafe(self._removed, names)
        except RuntimeError:  # this server's loop is closed, and the server with it
            pass

    def _removed(self, names: set[str]) -> None:
        for name in names:
            peer = self._peers.get(name)
            if peer is not None and peer.users == 0 and peer.ready.done():
                self._unregister(peer)

    def _forget(self, peer: _Peer) -> None:
        if self._peers.get(peer.name) is peer:
            del self._peers[peer.name]
            self.bytes -= peer.size

    def _unregister(self, peer: _Peer) -> None:
        self._forget(peer)
        if peer.ready.done() and peer.ready.result():
            task = asyncio.ensure_future(self._unregister_now(peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _unregister_now(self, peer: _Peer) -> None:
        try:
            await self.client.unregister_system_shared_memory(peer.registered_as)
        except Exception:  # noqa: BLE001 - the server may be gone
            logger.debug("unregistering %s failed", peer.registered_as, exc_info=True)

    @property
    def registered(self) -> list[str]:
        return list(self._peers)

    async def close(self) -> None:
        self.closed = True
        mappings.unlisten(self)
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        pending = [peer.ready for peer in self._peers.values() if not peer.ready.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for peer in list(self._peers.values()):
            self._unregister(peer)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
