"""Peers' regions mapped here: a lent frame copied out of its lender's region, or mapped where it lies.

A receiver may *map* a lent frame where it lies instead of copying it (:meth:`Mappings.borrow`),
copy-on-write, so that what it was handed may still be written to; it acknowledges the loan only when the
last view of the mapping is gone. A worker that only passes frames on (no Triton server: a Python operator
such as ``encoder_decoder``) lends what it sends on from there by the lender's name again (:class:`Borrowed`),
unless a page of it was written here (:func:`unwritten`); a worker with a Triton server has the server read
it from the lender's region (:mod:`tdask.triton.peers`); a caller keeps it as its answer. Relaying a large
tensor so costs no copy. ``tdask.transfer.mapped-frames-bytes`` bounds what one process maps so; past it,
frames are copied.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from tdask import config
from tdask.shm import lending
from tdask.shm.names import is_region_name, path


class RemovedListener(Protocol):
    """Told by :meth:`Mappings.sweep` which peers' regions are gone (a Triton server's registrations of them)."""

    def held(self) -> Iterable[str]:
        """The peers' regions it holds on to."""

    def removed(self, names: set[str]) -> None:
        """Those of them that their owner removed."""


class Mappings:
    """Read-only mappings of peers' regions, kept since regions are reused; those of regions their owner
    removed go first (they hold its memory), then the least recently used beyond
    ``tdask.transfer.kept-mappings-bytes``."""

    def __init__(self) -> None:
        self.bytes = 0
        self._maps: OrderedDict[str, tuple[int, mmap.mmap]] = OrderedDict()  # name -> (descriptor, mapping)
        self.borrowed_bytes = 0  # of frames mapped by borrow(), while they live
        self._borrowed_lock = threading.Lock()  # they end in whatever thread drops their last view
        self._swept = time.monotonic()
        self._listeners: list[RemovedListener] = []

    def mapped(self) -> list[str]:
        """The peers' regions mapped here now."""
        return list(self._maps)

    def size(self, name: str) -> int:
        """The size of the peer's region ``name`` (mapped here from now on)."""
        return len(self._mapping(name))

    def copy(self, name: str, offset: int, nbytes: int, into: memoryview) -> None:
        """Copy ``nbytes`` at ``offset`` of the peer's region ``name`` into ``into``."""
        mapping = self._mapping(name)
        if offset < 0 or nbytes < 0 or offset + nbytes > len(mapping) or nbytes != into.nbytes:
            raise ValueError(f"a peer lent {nbytes} bytes at {offset} of {name!r}, which has {len(mapping)}")
        with memoryview(mapping) as whole, whole[offset:offset + nbytes] as source:
            into[:] = source

    def _mapping(self, name: str) -> mmap.mmap:
        if not is_region_name(name):  # only tdask's regions for tensors
            raise ValueError(f"a peer lent a frame from {name!r}, which is not a tdask region")
        if time.monotonic() - self._swept > config.seconds("transfer.sweep-interval"):
            self.sweep()
        held = self._maps.get(name)
        if held is None:
            fd = os.open(path(name), os.O_RDONLY)
            try:
                mapping = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
            except BaseException:
                os.close(fd)
                raise
            self._maps[name] = (fd, mapping)
            self.bytes += len(mapping)
            limit = int(config.get("transfer.kept-mappings-bytes"))
            while self.bytes > limit and len(self._maps) > 1:
                self._drop(next(iter(self._maps)))
        else:
            self._maps.move_to_end(name)
            mapping = held[1]
        return mapping

    def listen(self, listener: RemovedListener) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)

    def unlisten(self, listener: RemovedListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def sweep(self) -> set[str]:
        """The one sweep of peers' regions that their owner removed (a worker that stopped or died): their
        mappings here go, else their memory stays, and every listener is told which of its regions are gone."""
        self._swept = time.monotonic()
        gone = {name for name, (fd, _) in self._maps.items() if os.fstat(fd).st_nlink == 0}
        for name in gone:
            self._drop(name)
        for listener in list(self._listeners):
            held = set(listener.held())
            removed = {name for name in held - self._maps.keys() if not path(name).exists()} | (held & gone)
            if removed:
                listener.removed(removed)
        return gone

    def may_borrow(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more may be mapped (``tdask.transfer.mapped-frames-bytes``): every frame mapped
        here keeps its lender's region taken while it lives, and a caller may hold its answers for long."""
        return self.borrowed_bytes + nbytes <= int(config.get("transfer.mapped-frames-bytes"))

    def borrow(self, name: str, offset: int, nbytes: int, returned: Callable[[], None]) -> memoryview:
        """``nbytes`` at ``offset`` of the peer's region ``name``, mapped here copy-on-write instead of copied;
        ``returned()`` runs (in whatever thread drops it) once the last view of it is gone, unless a stream
        that lent it on broke first (:meth:`Borrowed.retire`)."""
        size = len(self._mapping(name))  # checks the name, opens the region and keeps it open
        fd = self._maps[name][0]
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        if offset < 0 or nbytes <= 0 or offset + nbytes > size:
            raise ValueError(f"a peer lent {nbytes} bytes at {offset} of {name!r}, which has {size}")
        mapping = mmap.mmap(fd, offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        whole = memoryview(mapping)
        borrowed = Borrowed(name, start, _address(whole), len(mapping))
        lending.register(borrowed)
        with self._borrowed_lock:
            self.borrowed_bytes += borrowed.size
        weakref.finalize(mapping, self._returned, borrowed, returned).atexit = False
        lending.counts["mapped"] += 1
        return whole[offset - start:offset - start + nbytes]

    def _returned(self, borrowed: Borrowed, callback: Callable[[], None]) -> None:
        lending.unregister(borrowed)
        with self._borrowed_lock:
            self.borrowed_bytes -= borrowed.size
        if not borrowed.retired:
            callback()

    def discard(self, names: set[str]) -> None:
        for name in names & self._maps.keys():
            self._drop(name)

    def _drop(self, name: str) -> None:
        fd, mapping = self._maps.pop(name)
        self.bytes -= len(mapping)
        mapping.close()
        os.close(fd)

    def clear(self) -> None:
        for name in list(self._maps):
            self._drop(name)


mappings = Mappings()


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8, count=1).__array_interface__["data"][0] if view.nbytes else 0


class Borrowed:
    """A peer's frame mapped here (:meth:`Mappings.borrow`): what lies in it is lent on by the peer's name.

    Holds no reference to its mapping, which it outlives by no more than the mapping's finalizer.
    """

    def __init__(self, name: str, offset: int, address: int, size: int) -> None:
        self.name = name  # the lender's region
        self.offset = offset  # where the mapping starts in it
        self.address = address
        self.size = size
        self.retired = False

    def holds(self, array: np.ndarray) -> int | None:
        """The offset in the lender's region of ``array``'s data, if it lies here, unwritten."""
        address = array.__array_interface__["data"][0]
        start = address - self.address
        if 0 <= start and start + array.nbytes <= self.size and unwritten(address, array.nbytes):
            return self.offset + start
        return None

    def retire(self) -> None:
        """A peer that this was lent on to may still read the lender's region: never say it is returned."""
        self.retired = True


_PAGE = mmap.PAGESIZE
_pagemap: tuple[int, int] | None = None  # (pid, descriptor of /proc/self/pagemap; -1 where it cannot be read)
_pagemap_lock = threading.Lock()


def unwritten(address: int, nbytes: int) -> bool:
    """Whether no page of a copy-on-write mapping under ``address`` .. ``+nbytes`` has its own copy yet, so
    the lender's region still holds what it shows (``/proc/self/pagemap``: a page present but no longer the
    file's, or swapped out, was written). False where that cannot be read: the frame is then copied."""
    global _pagemap
    pid = os.getpid()
    if _pagemap is None or _pagemap[0] != pid:
        with _pagemap_lock:
            if _pagemap is None or _pagemap[0] != pid:
                try:
                    _pagemap = (pid, os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
                except OSError:
                    _pagemap = (pid, -1)
    fd = _pagemap[1]
    if fd < 0 or nbytes <= 0:
        return fd >= 0
    first, last = address // _PAGE, (address + nbytes - 1) // _PAGE
    try:
        entries = np.frombuffer(os.pread(fd, 8 * (last - first + 1), 8 * first), dtype=np.uint64)
    except OSError:
        return False
    flags = entries >> np.uint64(61)  # bit 2: present, 1: swapped, 0: a page of the file (or shared)
    present_own = (flags & np.uint64(0b101)) == np.uint64(0b100)
    return len(entries) == last - first + 1 and not (present_own.any() or (flags & np.uint64(0b010)).any())
