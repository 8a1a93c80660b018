"""The request stream's protocol: every message kind it carries, and the hello that opens it.

A caller opens one request stream to each worker it calls (:mod:`tdask.comm.stream`); the worker serves it
(:mod:`tdask.worker.extension`). The stream is a Dask comm: tdask's own socket for ``tcp://`` workers
(:mod:`tdask.comm.tcp`), the worker's Dask comm for ``tls://`` and ``ucx://``. The caller opens it with
the worker's Dask handler :data:`STREAM_HANDLER` and sends its :func:`hello` first, with the worker's token (a
random string each worker publishes in the scheduler's metadata, so only a member of the cluster knows it); the
worker checks it (:func:`check_hello`) and answers with its own hello, which names its host only to a caller
that showed the token. Nothing else is read or sent before.

After the hello, every message is a dict. A message the caller sends has an ``"op"`` from
:data:`MESSAGES`; one that expects an answer carries an ``"id"``, and its answer carries the same
``"id"`` and no ``"op"`` (a streamed request gets several, the last with ``"final"``; the worker sends at most
``window`` of them beyond those the caller acknowledged with ``credit``). The worker sends unasked only what
:data:`MESSAGES` lists as the worker's.
Errors in answers are ``{"error": ...}`` fields made by :func:`tdask.errors.to_wire`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from tdask.errors import ProtocolError

PROTOCOL_VERSION = 2  # 2: the caller's hello comes first and carries the worker's token
MAX_FRAMES = 1 << 20  # frames in one message at most: a count word beyond it ends the stream

# Dask handlers of a worker (registered by tdask.worker.extension)
STREAM_HANDLER = "tdask_stream"  # opens a request stream on this comm
SOCKET_HANDLER = "tdask_stream_socket"  # the worker's request-stream socket: {"address": ...}, or None
STATS_HANDLER = "tdask_stats"  # the worker's replicas' and Triton servers' counters

HELLO = "hello"
INFER = "infer"
STREAM = "stream"
CREDIT = "credit"
CANCEL = "cancel"
FETCH = "fetch"
RELEASE = "release"
LEASE = "lease"
LEASE_RETURN = "lease-return"
LEASE_REPORT = "lease-report"
CLOSE = "close-stream"
REVOKE = "revoke"


class Message(NamedTuple):
    sender: str  # "caller", "worker" or "both"
    fields: str
    answer: str  # what the answer holds; "" for a message that gets none


MESSAGES: dict[str, Message] = {
    HELLO: Message("both", "version, host (who may share memory with this end; empty: none); the caller's: "
                           "token (the worker's); the worker's: error (why it refuses the stream)", ""),
    INFER: Message("caller", "id, replica, request_id, inputs, parameters, keep, output_device",
                   "outputs (tensors or kept references) or error"),
    STREAM: Message("caller", "id, replica, request_id, inputs, parameters, output_device, window (responses it may "
                              "send unread)", "several: outputs (None: the end without a response) and final, or "
                              "error (ends it)"),
    CREDIT: Message("caller", "id, count (responses of stream id read: room for as many more)", ""),
    CANCEL: Message("caller", "id (the stream's reader stopped: its request is cancelled)", ""),
    FETCH: Message("caller", "id, keys (tensors kept on the worker)", "tensors by key, or error"),
    RELEASE: Message("caller", "keys (kept tensors no longer referenced)", ""),
    LEASE: Message("caller", "id, replica, slots (tdask.worker.lanes)", "granted, lane (the replica's server)"),
    LEASE_RETURN: Message("caller", "replica, slots, report (what ran on them)", ""),
    LEASE_REPORT: Message("caller", "replica, report (what ran on lent slots)", ""),
    CLOSE: Message("caller", "(the caller closes the stream)", ""),
    REVOKE: Message("worker", "replica, slots (a replica asks lent slots back)", ""),
}


def hello(host: bytes, *, token: str | None = None, error: str | None = None) -> dict[str, Any]:
    """What each end sends first: the protocol version, its host identity when memory may be shared, the
    worker's token (the caller's hello), or why the worker refuses the stream (the worker's)."""
    msg: dict[str, Any] = {"op": HELLO, "version": PROTOCOL_VERSION, "host": host}
    if token is not None:
        msg["token"] = token
    if error is not None:
        msg["error"] = error
    return msg


def check_hello(msg: Any, peer: str) -> dict[str, Any]:
    """The peer's hello as ``{"host": bytes, "token": str | None}``; a :class:`ProtocolError` when it is not one,
    when the versions differ (naming both), or when the peer refuses the stream (saying why)."""
    if not isinstance(msg, dict) or msg.get("op") != HELLO:
        raise ProtocolError(f"{peer} did not open the request stream with tdask's hello (got {msg!r:.100}); "
                            "it is not tdask, or a tdask older than request-stream protocol version 1")
    version = msg.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{peer} speaks tdask's request-stream protocol version {version}, this process "
                            f"version {PROTOCOL_VERSION}: run the same tdask version in every process of the cluster")
    if msg.get("error"):
        raise ProtocolError(f"{peer} refused the request stream: {str(msg['error'])[:500]}")
    host, token = msg.get("host") or b"", msg.get("token")
    return {"host": bytes(host) if isinstance(host, (bytes, bytearray, memoryview)) else b"",
            "token": token if isinstance(token, str) else None}
