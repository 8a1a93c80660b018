"""Lending: a large frame that lies in a tdask shared-memory region is passed to a peer by name, not by bytes.

A request stream between two processes that share ``/dev/shm`` (:func:`host_identity`, said in the stream's
hello) sends a large frame that lies in a region registered here (:func:`register`: this process's own
regions, :mod:`tdask.shm.regions`, and peers' frames mapped here, :mod:`tdask.shm.mappings`) as the region's
name, offset and size (:mod:`tdask.comm.tcp`). The receiver copies it out, or maps it where it lies, and
acknowledges the loan; the region stays taken until then. ``tdask.transfer.shared-memory-frames: false``
turns lending off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

import numpy as np

from tdask import config
from tdask.shm.names import SHM_DIR


class InPlace:
    """The type of :data:`IN_PLACE`."""

    def __repr__(self) -> str:
        return "IN_PLACE"


IN_PLACE = InPlace()
"""What a landing gives where a frame is best not copied: a lent frame is mapped where it lies
(:meth:`tdask.shm.mappings.Mappings.borrow`), and one sent through the socket lands in the frame pool. Either
can be lent on to the next worker or back to a caller without a copy, and a Triton server can read a mapped one
where it lies (:mod:`tdask.triton.peers`)."""

# where a large frame of this many bytes is received; whether the peer lent it (else it comes through the socket)
Landing = Callable[[int, bool], Awaitable["memoryview | InPlace | None"]]


async def caller_landing(nbytes: int, lent: bool) -> InPlace | None:
    """A caller maps an answer lent to it where it lies instead of copying it (the worker's region stays
    taken until the caller drops the answer, up to ``tdask.transfer.mapped-frames-bytes``); one sent through
    the socket gets a buffer of its own."""
    return IN_PLACE if lent else None


class Lendable(Protocol):
    """A shared-memory region of this process, or a peer's mapped here, that frames may be lent from."""

    name: str

    def holds(self, array: np.ndarray) -> int | None:
        """The offset of ``array``'s data in the region, if it lies wholly inside it."""

    def retire(self) -> None:
        """Never reuse the region: a peer may still read it (its stream broke before it acknowledged)."""


_regions: set[Lendable] = set()
# large frames lent to and borrowed from peers, lent after a copy into the frame pool, sent through the socket;
# of those borrowed, the ones mapped in place; of those lent, the ones lent on by their lender's name
counts = {"lent": 0, "borrowed": 0, "staged": 0, "sent": 0, "mapped": 0, "relent": 0}


def wanted() -> bool:
    """Whether frames are lent at all (``tdask.transfer.shared-memory-frames``)."""
    return bool(config.get("transfer.shared-memory-frames"))


def register(region: Lendable) -> None:
    _regions.add(region)


def unregister(region: Lendable) -> None:
    _regions.discard(region)


def regions() -> list[Lendable]:
    """The regions frames may be lent from now (this process's own, and peers' frames mapped here)."""
    return list(_regions)


def find(view: memoryview, kind: type = object) -> tuple[Lendable, int] | None:
    """The registered region (of type ``kind``) that holds all of ``view``, and the offset there."""
    if not _regions or not view.c_contiguous:
        return None
    array = np.frombuffer(view, dtype=np.uint8)
    for region in tuple(_regions):  # a copy: regions of the frame pool come and go in any thread
        if isinstance(region, kind):
            offset = region.holds(array)
            if offset is not None:
                return region, offset
    return None


@functools.cache
def host_identity() -> bytes:
    """Equal in two processes only when they see the same ``/dev/shm`` files with the same rights."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/mnt")
        st = os.stat(SHM_DIR)
    except OSError:
        return b""
    return f"{boot}|{namespace}|{st.st_dev}:{st.st_ino}|{os.getuid()}".encode()



