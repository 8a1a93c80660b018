"""Coalescing writes on a Dask comm: what is queued while one write is on the wire leaves in the next.

Dask's ``BatchedSend`` does the same with tornado events and timeouts; this asyncio-native
version wakes no timer, so a lone request leaves at once and a burst leaves in few writes.
Messages queued in one loop iteration leave together at the start of the next; on a comm that
can send a small batch at once (:meth:`tdask.comm.tcp.SocketComm.try_write`) that needs no task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed.comm import CommClosedError

from tdask import config

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
        self._flushing = False  # a flush is scheduled for the next loop iteration
        self._try_write = getattr(comm, "try_write", None)
        self.closed = False
        self.batches = 0
        self.messages = 0

    @property
    def idle(self) -> bool:
        """Whether nothing is queued or being written."""
        return self._task is None and not self._flushing and not self.buffer

    def send(self, msg: Any) -> None:
        if self.closed or self.comm.closed():
            raise CommClosedError(f"comm {self.comm!r} is closed")
        if len(self.buffer) >= int(config.get("transfer.max-unread-messages")):  # only while a write is stuck
            self.abort()
            raise CommClosedError(f"{self.comm.peer_address} reads nothing of what it is sent: {len(self.buffer)} "
                                  "messages wait for it (tdask.transfer.max-unread-messages); its stream ends")
        self.buffer.append(msg)
        if self._task is None and not self._flushing:
            if self._try_write is None:
                self._task = asyncio.ensure_future(self._drain())
            else:
                self._flushing = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self._task is not None or not self.buffer or self.closed:
            return
        try:
            encoded = self._try_write(self._take())
        except Exception as e:  # noqa: BLE001 - the writer stops, as when a write in _drain fails
            self._stopped(e)
            return
        if encoded is not None:
            self._task = asyncio.ensure_future(self._drain(encoded))

    async def _drain(self, encoded: Any = None) -> None:
        try:
            if encoded is not None:  # a batch try_write could not send at once
                await self.comm.write_encoded(encoded)
            while self.buffer:
                await self.comm.write(self._take(), on_error="raise")
        except Exception as e:  # noqa: BLE001 - see _stopped
            self._stopped(e)
        finally:
            self._task = None

    def _take(self) -> list[Any]:
        """The queued messages, as one batch to write."""
        batch, self.buffer = self.buffer, []
        self.batches += 1
        self.messages += len(batch)
        return batch

    def _stopped(self, error: Exception) -> None:
        """A write failed: a closed comm is expected (the peer went away), anything else is logged."""
        if isinstance(error, (CommClosedError, OSError)):
            logger.debug("writer for %s stopped: %r", self.comm.peer_address, error)
        else:
            logger.error("writing to %s failed", self.comm.peer_address, exc_info=error)
        self.abort()

    async def flush(self, timeout: float = 2) -> None:
        """Let queued messages leave (used before closing)."""
        if self._flushing:
            self._flush()  # what waits for the next iteration leaves now
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except Exception:
                pass

    def abort(self) -> None:
        self.closed = True
        self.buffer = []
        if not self.comm.closed():
            self.comm.abort()
