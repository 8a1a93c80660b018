"""Coalescing writes on a Dask comm: what is queued while one write is on the wire leaves in the next.

Dask's ``BatchedSend`` does the same with tornado events and timeouts; this asyncio-native
version wakes no timer, so a lone request leaves at once and a burst leaves in few writes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed.comm import CommClosedError

logger = logging.getLogger(__name__)


class CoalescingWriter:
    """Writes lists of messages to ``comm``; one write in flight at a time."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        # Dask would size every batch (a recursive sizeof) to decide whether to serialize it in a
        # thread; tensors travel as frames that need no copying, so that check only costs time
        comm.allow_offload = False
        self.buffer: list[Any] = []
        self._task: asyncio.Task | None = None
        self.closed = False
        self.batches = 0
        self.messages = 0

    def send(self, msg: Any) -> None:
        if self.closed or self.comm.closed():
            raise CommClosedError(f"comm {self.comm!r} is closed")
        self.buffer.append(msg)
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self.buffer:
                batch, self.buffer = self.buffer, []
                self.batches += 1
                self.messages += len(batch)
                await self.comm.write(batch, on_error="raise")
        except (CommClosedError, OSError) as e:
            logger.debug("writer for %s stopped: %r", self.comm.peer_address, e)
            self.abort()
        except Exception:
            logger.exception("writing to %s failed", self.comm.peer_address)
            self.abort()
        finally:
            self._task = None

    async def flush(self, timeout: float = 2) -> None:
        """Let queued messages leave (used before closing)."""
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except (TimeoutError, Exception):
                pass

    def abort(self) -> None:
        self.closed = True
        self.buffer = []
        if not self.comm.closed():
            self.comm.abort()
