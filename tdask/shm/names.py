"""Names of tdask's ``/dev/shm`` regions, and the sweep of those whose owner died.

Every region tdask creates is named after the process that owns it: ``REGION_PREFIX`` + pid for a
process's own regions (:mod:`tdask.shm.regions`), ``STUB_PREFIX`` + pid for those of the Python-backend
stubs of a Triton server that tdask started (:mod:`tdask.triton.server`). A SIGKILLed process runs no code
to remove its regions; :func:`sweep_orphaned_regions` removes them once their owner is gone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
REGION_PREFIX = "tdask_pool_"  # + owner pid + "_": a process's regions for tensors
STUB_PREFIX = "tdask_triton_"  # + owner pid + "_": regions of a Triton server's Python-backend stubs


def is_region_name(name: str) -> bool:
    """Whether ``name`` can be one of tdask's regions for tensors (what a peer may lend a frame from)."""
    return name.startswith(REGION_PREFIX) and "/" not in name and len(name) <= 200


def path(name: str) -> Path:
    return SHM_DIR / name


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def owner_gone(name: str, prefix: str, separator: str) -> bool:
    """Whether ``name`` (``prefix`` + owner pid + ``separator`` + ...) names an owner that is dead; a name
    without an owner pid is not ours to judge."""
    owner = name[len(prefix):].split(separator, 1)[0]
    return owner.isdigit() and not pid_alive(int(owner))


def sweep_orphaned_regions() -> None:
    """Remove tdask's regions whose owning process is gone."""
    for prefix in (STUB_PREFIX, REGION_PREFIX):
        for region in SHM_DIR.glob(f"{prefix}*"):
            if owner_gone(region.name, prefix, "_"):
                logger.info("removing %s: the process that owned it is gone", region)
                try:
                    region.unlink(missing_ok=True)
                except OSError as e:  # another user's, in a sticky /dev/shm: theirs to remove
                    logger.debug("cannot remove %s: %s", region, e)
