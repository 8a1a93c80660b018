"""Named ``/dev/shm`` regions of this process, and the one pool that reuses them.

A :class:`Region` hands out its memory through *leases*: arrays and buffers built on a lease keep the
region out of its pool until the last of them is gone, so data can be used where it lies. Every region is
registered for lending (:mod:`tdask.shm.lending`), so a request stream may lend what lies in one to a peer
on this host instead of sending it.

:class:`RegionPool` serves two owners. Each process has a *frame pool* (:func:`frame_pool`) for large frames
of request streams that lie in no Triton region: a tensor a caller sends is copied into one and lent, and a
worker without a Triton server receives large frames into one, so that it can lend them on. Each Triton
client (:mod:`tdask.triton.client`) has a pool whose regions it registers with its server, so that tensors
in them are a model's inputs and outputs where they lie. Names carry the owner's pid
(:mod:`tdask.shm.names`), so regions of a process that died are swept.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import os
import shutil
import threading
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from tdask import config
from tdask.shm import lending
from tdask.shm.names import REGION_PREFIX, SHM_DIR

logger = logging.getLogger(__name__)

MIN_REGION = 1 << 20


def size_class(nbytes: int) -> int:
    """Regions come in powers of two from 1 MiB, so that they can be reused for similar sizes."""
    return max(MIN_REGION, 1 << (max(nbytes, 1) - 1).bit_length())


class Region:
    """One system shared-memory region, created by this process.

    Arrays handed out from it view its memory through a *lease*: the region goes back to its pool only
    when the last array viewing it is gone, so they cost no copy and can be passed on in place.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.key = f"/{name}"
        self.size = size
        self.shm: shared_memory.SharedMemory | None = shared_memory.SharedMemory(name, create=True, size=size)
        self.buf = self.shm.buf
        probe = np.frombuffer(self.buf, dtype=np.uint8, count=1)
        self.address = probe.__array_interface__["data"][0]
        del probe  # no buffer export may outlive this: it would keep the mapping from closing
        self.leased = False
        self.reusable = True
        lending.register(self)  # a request stream may lend what lies here to a peer on this host

    def view(self, dtype: Any, shape: list[int], offset: int) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=self.buf, offset=offset)

    def lease(self, returned: Callable[[Region], None]) -> Any:
        """An object whose lifetime is the region's time out of its pool: arrays built on it keep it;
        ``returned(region)`` runs (in whatever thread drops it) once it is gone."""
        lease = _lease_type(self.size).from_address(self.address)
        lease.region = self  # the mapping outlives every array that views it
        self.leased = True
        weakref.finalize(lease, returned, self).atexit = False
        return lease

    def holds(self, array: np.ndarray) -> int | None:
        """The offset of ``array``'s data in this region, if it lies wholly inside it."""
        start = array.__array_interface__["data"][0] - self.address
        if 0 <= start and start + array.nbytes <= self.size:
            return start
        return None

    def retire(self) -> None:
        """Dropped, not reused, once its last view is gone (a peer may still read what was lent from it, or a
        server still write into it)."""
        self.reusable = False

    def unlink(self) -> None:
        lending.unregister(self)
        if self.shm is not None:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    def destroy(self) -> None:
        lending.unregister(self)
        shm, self.shm, self.buf = self.shm, None, None
        if shm is None:
            return
        try:
            shm.close()
            shm.unlink()
        except (FileNotFoundError, BufferError, OSError):  # best effort at shutdown
            logger.debug("destroying shared memory region %s failed", self.name, exc_info=True)


@functools.cache
def _lease_type(size: int) -> type:
    # a ctypes array subclass: exposes the region's bytes as a buffer and takes weak references
    return type(f"_Lease{size}", (ctypes.c_char * size,), {})


class RegionPool:
    """Regions by power-of-two size class, leased one at a time and reused once their last view is gone.

    Thread-safe: leases end in whatever thread drops the last view. ``leased_limit`` bounds the bytes leased
    at once (None: unbounded) and ``idle_limit`` those kept for reuse, both read when needed; past the
    limit, or with ``/dev/shm`` short of room, :meth:`take` gives None. ``destroyed(region)`` runs for each
    region removed (its owner unregisters it from a Triton server).
    """

    def __init__(self, tag: str, *, idle_limit: Callable[[], int],
                 leased_limit: Callable[[], int | None] = lambda: None,
                 destroyed: Callable[[Region], None] | None = None) -> None:
        self.pid = os.getpid()
        self.prefix = f"{REGION_PREFIX}{self.pid}_{tag}{uuid.uuid4().hex[:8]}"  # swept once this process is gone
        self._idle_limit, self._leased_limit, self._destroyed = idle_limit, leased_limit, destroyed
        self.leased_bytes = self.idle_bytes = 0
        self.refused = 0  # regions refused for want of room
        self._free: dict[int, list[Region]] = defaultdict(list)
        self._leased: set[Region] = set()
        self._n = 0
        # reentrant: a lease can end in a garbage collection that runs while this thread holds the lock
        self._lock = threading.RLock()
        self.closed = False

    def take(self, nbytes: int) -> Region | None:
        """A region of at least ``nbytes``, leased to the caller (give it back through :meth:`lease`'s views or
        :meth:`give`); None when the pool has no room for it."""
        size = size_class(nbytes)
        with self._lock:
            limit = self._leased_limit()
            if self.closed or (limit is not None and self.leased_bytes + size > limit):
                self.refused += 1
                return None
            self.leased_bytes += size
            region = self._free[size].pop() if self._free[size] else None
            if region is not None:
                self.idle_bytes -= size
            else:
                self._n += 1
                name = f"{self.prefix}_{self._n}"
        if region is None:
            region = self._create(name, size)
            if region is None:
                with self._lock:
                    self.leased_bytes -= size
                    self.refused += 1
                return None
        with self._lock:
            self._leased.add(region)
        return region

    def lease(self, region: Region) -> Any:
        """A lease of ``region`` (taken from this pool): the region comes back when the lease is gone."""
        return region.lease(self.give)

    def lease_view(self, region: Region, nbytes: int) -> memoryview:
        """The first ``nbytes`` of ``region`` (taken from this pool) as one view on a lease of it."""
        return memoryview(self.lease(region)).cast("B")[:nbytes]

    def view(self, nbytes: int) -> memoryview | None:
        """``nbytes`` at the start of a leased region, as one view; None when the pool has no room."""
        region = self.take(nbytes)
        return None if region is None else self.lease_view(region, nbytes)

    def copy_in(self, view: memoryview) -> tuple[Region, memoryview] | None:
        """A copy of ``view`` at the start of a leased region, and that region; None as for :meth:`take`."""
        region = self.take(view.nbytes)
        if region is None:
            return None
        copy = self.lease_view(region, view.nbytes)
        copy[:] = view
        return region, copy

    def find(self, array: np.ndarray) -> tuple[Region, int] | None:
        """The leased region of this pool that holds ``array``, and the offset there."""
        if not array.flags.c_contiguous:
            return None
        with self._lock:
            leased = tuple(self._leased)
        for region in leased:
            offset = region.holds(array)
            if offset is not None:
                return region, offset
        return None

    @staticmethod
    def _create(name: str, size: int) -> Region | None:
        free = shutil.disk_usage(SHM_DIR).free
        if free < 2 * size:  # tmpfs allocates pages on first touch: a full /dev/shm would SIGBUS the process
            logger.info("no shared-memory region of %d bytes: %s has %d bytes free", size, SHM_DIR, free)
            return None
        try:
            return Region(name, size)
        except OSError as e:
            logger.warning("no shared-memory region of %d bytes: %s", size, e)
            return None

    def give(self, region: Region) -> None:
        """``region`` is back: kept for reuse, or removed (retired, over the idle limit, pool closed)."""
        with self._lock:
            if region not in self._leased:
                return
            self._leased.discard(region)
            self.leased_bytes -= region.size
            region.leased = False
            keep = not self.closed and region.reusable and self.idle_bytes + region.size <= self._idle_limit()
            if keep:
                self._free[region.size].append(region)
                self.idle_bytes += region.size
        if not keep:  # a retired region may still be read by a peer or written by a server: never reused
            self._destroy(region)

    def _destroy(self, region: Region) -> None:
        region.destroy()
        if self._destroyed is not None:
            self._destroyed(region)

    def leased(self) -> list[Region]:
        """The regions out of the pool now."""
        with self._lock:
            return list(self._leased)

    def regions(self) -> list[Region]:
        """Every region of the pool: leased, and kept for reuse."""
        with self._lock:
            return [*self._leased, *(region for regions in self._free.values() for region in regions)]

    def close(self) -> None:
        """Remove every region: idle ones now, leased ones as their views go."""
        with self._lock:
            self.closed = True
            idle = [region for regions in self._free.values() for region in regions]
            self._free.clear()
            self.idle_bytes = 0
            leased = list(self._leased)
        for region in idle:
            self._destroy(region)
        for region in leased:
            region.unlink()


class FramePool(RegionPool):
    """The process's regions for large frames in transit (``tdask.transfer.shared-memory-frames-bytes`` leased
    at most); frames under 1 MiB are cheap on the socket and never take one."""

    def __init__(self) -> None:
        super().__init__("f", leased_limit=lambda: int(config.get("transfer.shared-memory-frames-bytes")),
                         idle_limit=lambda: min(int(config.get("transfer.shared-memory-frames-bytes")),
                                                int(config.get("transfer.shared-memory-frames-idle-bytes"))))

    def take(self, nbytes: int) -> Region | None:
        return super().take(nbytes) if nbytes >= MIN_REGION else None


_pool: FramePool | None = None
_pool_lock = threading.Lock()


def frame_pool() -> FramePool:
    """This process's :class:`FramePool`."""
    global _pool
    if _pool is None or _pool.pid != os.getpid():  # made here, not inherited through a fork
        with _pool_lock:
            if _pool is None or _pool.pid != os.getpid():
                _pool = FramePool()
                atexit.register(_pool.close)
    return _pool
