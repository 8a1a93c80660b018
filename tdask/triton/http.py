"""Inference requests to a Triton server over keep-alive HTTP/1.1, on the caller's event loop.

Triton's HTTP/REST endpoint with its binary tensor extension: a JSON header, then the raw tensor
bytes. Each connection is an :class:`asyncio.Protocol` that carries one request at a time and is
reused; no threads and no per-call objects beyond the request itself (what that saves against gRPC and
``tritonclient``'s HTTP clients: docs/design.md). Tensors in Triton's system shared memory travel the same
way, named by region and offset instead of sent (Triton's shared-memory extension of the same protocol).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import numpy as np
from tritonclient.utils import (
    TRITON_RESERVED_REQUEST_PARAMS,
    TRITON_RESERVED_REQUEST_PARAMS_PREFIX,
    deserialize_bytes_tensor,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from tdask.errors import InvalidRequestError, TritonError

_STATUS = {400: "StatusCode.INVALID_ARGUMENT", 404: "StatusCode.NOT_FOUND", 503: "StatusCode.UNAVAILABLE"}
_HEADER_LENGTH = "inference-header-content-length"


class InputRegion(NamedTuple):
    """Where in Triton's shared memory an input lies."""

    region: str
    offset: int


class OutputRegion(NamedTuple):
    """Where Triton writes an output, and how to view it there once written."""

    region: str
    size: int
    offset: int
    view: Callable[[np.dtype, tuple[int, ...]], np.ndarray]


def triton_error(model: str, message: str, status: str, connection: str | None = None) -> TritonError:
    """Keep Triton's own message; with its status (e.g. ``StatusCode.UNAVAILABLE``)."""
    return TritonError(f"{model}: {message}", status=status, connection=connection)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; answers are framed by ``Content-Length``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future | None = None
        self._head: tuple[int, dict[str, str], int, int] | None = None  # status, headers, body start, end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self._buf[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            length = headers.get("content-length")
            if length is None:
                self._fail(ConnectionError(f"Triton answered without Content-Length ({lines[0]!r})"))
                return
            self._head = (int(lines[0].split(" ", 2)[1]), headers, end + 4, end + 4 + int(length))
        status, headers, start, stop = self._head
        if len(self._buf) < stop:
            return
        body = bytes(self._buf[start:stop])
        del self._buf[:stop]
        self._head = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, headers, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"Triton closed the connection ({exc or 'end of stream'})"))

    def _fail(self, error: Exception) -> None:
        self.close()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def request(self, head: bytes, body: list[Any]) -> asyncio.Future:
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(b"".join([head, *body]))
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class TritonHttp:
    """Infer requests to one server; idle connections are kept and reused, one per request in flight."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url if "//" in url else f"http://{url}")
        self.host, self.port = parts.hostname or "127.0.0.1", int(parts.port or 80)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        self._open.add(conn)
        return conn

    async def infer(self, model: str, model_version: str, request_id: str, inputs: list[tuple[str, str, np.ndarray]],
                    parameters: dict | None, outputs: list[str] | None, *,
                    in_regions: dict[str, InputRegion] | None = None,
                    out_regions: dict[str, OutputRegion] | None = None) -> dict[str, np.ndarray]:
        """Inputs named in ``in_regions`` are read from shared memory, outputs in ``out_regions`` written there."""
        header, payloads = _request(request_id, inputs, parameters, outputs, in_regions, out_regions)
        path = f"/v2/models/{quote(model, safe='')}"
        if model_version:
            path += f"/versions/{quote(model_version, safe='')}"
        size = len(header) + sum(len(p) for p in payloads)
        head = (f"POST {path}/infer HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {size}\r\n\r\n").encode()
        try:
            conn = await self._connection()
        except OSError as e:  # nothing was sent
            raise triton_error(model, f"cannot connect to Triton at {self.host}:{self.port}: {e}",
                               "StatusCode.UNAVAILABLE", connection="refused") from e
        reusable = False
        try:
            status, headers, body = await conn.request(head, [header, *payloads])
            reusable = headers.get("connection", "").lower() != "close"
        except ConnectionError as e:
            raise triton_error(model, f"the connection to Triton ended ({e}); the request may or may not have run",
                               "StatusCode.UNAVAILABLE", connection="lost") from e
        finally:  # a request cancelled mid-way leaves its answer on the connection: never reuse that one
            if reusable:
                self._idle.append(conn)
            else:
                conn.close()
                self._open.discard(conn)
        return _response(model, status, headers, body, outputs, out_regions)

    def stats(self) -> dict[str, int]:
        """Connections open now, and of them those idle (kept for the next request)."""
        return {"open": len(self._open), "idle": sum(not conn.closed for conn in self._idle)}

    async def close(self) -> None:
        conns, self._open, self._idle = self._open, set(), []
        for conn in conns:
            conn.close()


def _region(region: str, size: int, offset: int) -> dict[str, Any]:
    return {"shared_memory_region": region, "shared_memory_byte_size": size, "shared_memory_offset": offset}


def _numpy_dtype(model: str, name: str, datatype: str) -> Any:
    dtype = triton_to_np_dtype(datatype)
    if dtype is None:
        raise TritonError(f"{model}: output {name!r} has unsupported datatype {datatype}")
    return dtype


def _request(request_id: str, inputs: list[tuple[str, str, np.ndarray]], parameters: dict | None,
             outputs: list[str] | None, in_regions: dict[str, InputRegion] | None = None,
             out_regions: dict[str, OutputRegion] | None = None) -> tuple[bytes, list[Any]]:
    tensors, payloads = [], []
    for name, datatype, array in inputs:
        if in_regions and name in in_regions:
            where = in_regions[name]
            tensors.append({"name": name, "shape": list(array.shape), "datatype": datatype,
                            "parameters": _region(where.region, array.nbytes, where.offset)})
            continue
        if datatype == "BYTES":
            serialized = serialize_byte_tensor(array)
            data = serialized.item() if serialized.size else b""
        else:
            data = np.ascontiguousarray(array).data.cast("B")
        tensors.append({"name": name, "shape": list(array.shape), "datatype": datatype,
                        "parameters": {"binary_data_size": len(data)}})
        payloads.append(data)
    request: dict[str, Any] = {"inputs": tensors}
    if request_id:
        request["id"] = request_id
    for key, value in (parameters or {}).items():
        if key in TRITON_RESERVED_REQUEST_PARAMS or key.startswith(TRITON_RESERVED_REQUEST_PARAMS_PREFIX):
            raise InvalidRequestError(f"parameter {key!r} is reserved by Triton")
        if not isinstance(value, (str, bool, int, float)):
            raise InvalidRequestError(f"parameter {key!r} has unsupported type {type(value).__name__}")
    request["parameters"] = {**(parameters or {}), "binary_data_output": True}
    if outputs:
        out_regions = out_regions or {}
        request["outputs"] = [
            {"name": name, "parameters": _region(o.region, o.size, o.offset) if (o := out_regions.get(name))
             else {"binary_data": True}}
            for name in outputs
        ]
    return json.dumps(request, separators=(",", ":")).encode(), payloads


def _response(model: str, status: int, headers: dict[str, str], body: bytes, wanted: list[str] | None,
              out_regions: dict[str, OutputRegion] | None = None) -> dict[str, np.ndarray]:
    length = int(headers.get(_HEADER_LENGTH, len(body)))
    try:
        answer = json.loads(body[:length])
    except ValueError:
        raise triton_error(model, f"HTTP {status}: {body[:200]!r}", _STATUS.get(status, "StatusCode.UNKNOWN")) from None
    if status != 200:
        raise triton_error(model, answer.get("error", f"HTTP {status}"), _STATUS.get(status, "StatusCode.UNKNOWN"))
    arrays: dict[str, np.ndarray] = {}
    offset = length
    for out in answer.get("outputs", ()):
        name, datatype = out["name"], out["datatype"]
        shape = tuple(int(d) for d in out["shape"])
        if out_regions and name in out_regions:  # Triton wrote it into shared memory (never BYTES)
            arrays[name] = out_regions[name].view(np.dtype(_numpy_dtype(model, name, datatype)), shape)
            continue
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            raise TritonError(f"{model}: output {name!r} came without its data")
        data = body[offset:offset + size]
        offset += size
        if wanted and name not in wanted:
            continue
        if datatype == "BYTES":
            array = deserialize_bytes_tensor(data)
        else:
            array = np.frombuffer(data, dtype=_numpy_dtype(model, name, datatype))
        arrays[name] = array.reshape(shape)
    for name in wanted or ():
        if name not in arrays:
            raise TritonError(f"{model}: response has no output {name!r}")
    return arrays
