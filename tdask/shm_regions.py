"""Named ``/dev/shm`` regions of this process, and the pool of them that frames in transit use.

A :class:`Region` hands out its memory through *leases*: arrays and buffers built on a lease keep the
region out of its pool until the last of them is gone, so data can be used where it lies. Every region
is registered with :mod:`tdask.shm_frames`, so a request stream may lend what lies in one to a peer on
this host instead of sending it.

Two pools own regions: a Triton client's (:mod:`tdask.triton_client`, regions registered with its
server) and :class:`FramePool`, one per process, for large frames of request streams that are in no
Triton region: a tensor a caller sends is copied into one and lent (two copies of memory instead of a
trip through loopback TCP), and a worker without a Triton server receives large frames into one, so that
it can lend them on. Its names share the pool prefix, so :mod:`tdask.triton_server`'s sweep removes
those of a process that died.
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
from multiprocessing import shared_memory
from typing import Any, Protocol

import numpy as np

from tdask import config, shm_frames
from tdask.triton_server import POOL_SHM_PREFIX, SHM_DIR

logger = logging.getLogger(__name__)

MIN_REGION = 1 << 20


def size_class(nbytes: int) -> int:
    """Regions come in powers of two from 1 MiB, so that they can be reused for similar sizes."""
    return max(MIN_REGION, 1 << (max(nbytes, 1) - 1).bit_length())


class _Owner(Protocol):
    def returned(self, region: Region) -> None:
        """The last lease of ``region`` is gone (called from any thread)."""


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
        shm_frames.register(self)  # a request stream may lend what lies here to a peer on this host

    def view(self, dtype: Any, shape: list[int], offset: int) -> np.ndarray:
        return np.ndarray(shape, dtype, buffer=self.buf, offset=offset)

    def lease(self, pool: _Owner) -> Any:
        """An object whose lifetime is the region's time out of the pool: arrays built on it keep it."""
        lease = _lease_type(self.size).from_address(self.address)
        lease.region = self  # the mapping outlives every array that views it
        self.leased = True
        weakref.finalize(lease, pool.returned, self).atexit = False
        return lease

    def holds(self, array: np.ndarray) -> int | None:
        """The offset of ``array``'s data in this region, if it lies wholly inside it."""
        start = array.__array_interface__["data"][0] - self.address
        if 0 <= start and start + array.nbytes <= self.size:
            return start
        return None

    def retire(self) -> None:
        """Dropped, not reused, once its last view is gone (a peer may still read what was lent from it)."""
        self.reusable = False

    def unlink(self) -> None:
        shm_frames.unregister(self)
        if self.shm is not None:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    def destroy(self) -> None:
        shm_frames.unregister(self)
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


class FramePool:
    """Plain regions (registered with no server) for large frames in transit, shared by every event loop
    of the process: a region is leased for one frame and back when its last view is gone.

    At most ``limit`` bytes are leased at once and ``idle_limit`` kept for reuse; past the limit, or with
    ``/dev/shm`` short of room, :meth:`lease` says None and the frame takes the socket and ordinary memory.
    """

    def __init__(self, limit: int, idle_limit: int) -> None:
        self.limit, self.idle_limit = limit, idle_limit
        self.pid = os.getpid()
        self.prefix = f"{POOL_SHM_PREFIX}{self.pid}_f{uuid.uuid4().hex[:8]}"  # swept once this process is gone
        self.leased_bytes = self.idle_bytes = 0
        self.refused = 0  # leases refused for want of room: those frames went the ordinary way
        self._free: dict[int, list[Region]] = defaultdict(list)
        self._leased: set[Region] = set()
        self._n = 0
        # leases end in whatever thread drops the last view; reentrant, as that can be a garbage collection
        # that runs while this thread holds the lock
        self._lock = threading.RLock()
        self.closed = False

    def lease(self, nbytes: int) -> memoryview | None:
        """``nbytes`` of a leased region; None for a frame under 1 MiB (it is cheap on the socket) or when the
        pool has no room for it."""
        leased = self._lease(nbytes)
        return None if leased is None else leased[1]

    def copy_in(self, view: memoryview) -> tuple[Region, memoryview] | None:
        """A copy of ``view`` at the start of a leased region, and that region; None as for :meth:`lease`."""
        leased = self._lease(view.nbytes)
        if leased is not None:
            leased[1][:] = view
        return leased

    def _lease(self, nbytes: int) -> tuple[Region, memoryview] | None:
        if nbytes < MIN_REGION:
            return None
        size = size_class(nbytes)
        with self._lock:
            if self.closed or self.leased_bytes + size > self.limit:
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
        return region, memoryview(region.lease(self)).cast("B")[:nbytes]

    @staticmethod
    def _create(name: str, size: int) -> Region | None:
        free = shutil.disk_usage(SHM_DIR).free
        if free < 2 * size:  # tmpfs allocates pages on first touch: leave room for Triton's regions
            logger.info("no shared-memory region for a %d-byte frame: %s has %d bytes free", size, SHM_DIR, free)
            return None
        try:
            return Region(name, size)
        except OSError as e:
            logger.warning("no shared-memory region for a %d-byte frame: %s", size, e)
            return None

    def returned(self, region: Region) -> None:
        with self._lock:
            self._leased.discard(region)
            self.leased_bytes -= region.size
            region.leased = False
            keep = not self.closed and region.reusable and self.idle_bytes + region.size <= self.idle_limit
            if keep:
                self._free[region.size].append(region)
                self.idle_bytes += region.size
        if not keep:  # a retired region may still be read by a peer: its file goes, never its reuse
            region.destroy()

    def close(self) -> None:
        """Remove every region (at exit): idle ones now, leased ones as their views go."""
        with self._lock:
            self.closed = True
            idle = [region for regions in self._free.values() for region in regions]
            self._free.clear()
            self.idle_bytes = 0
            leased = list(self._leased)
        for region in idle:
            region.destroy()
        for region in leased:
            region.unlink()


_pool: FramePool | None = None
_pool_lock = threading.Lock()


def frame_pool() -> FramePool:
    """This process's :class:`FramePool` (``tdask.transfer.shared-memory-frames-bytes``)."""
    global _pool
    if _pool is None or _pool.pid != os.getpid():  # made here, not inherited through a fork
        with _pool_lock:
            if _pool is None or _pool.pid != os.getpid():
                limit = int(config.get("transfer.shared-memory-frames-bytes"))
                _pool = FramePool(limit, min(limit, MIN_REGION << 8))
                atexit.register(_pool.close)
    return _pool
