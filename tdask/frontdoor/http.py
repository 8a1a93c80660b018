"""The KServe v2 HTTP/REST front door (aiohttp): health, metadata, inference with JSON tensors and the binary
tensor data extension, statistics, the repository index, and the front door's Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tdask import compat, config
from tdask.compat import TimeoutErrors
from tdask.errors import InvalidRequestError, OverloadedError, TdaskError
from tdask.frontdoor import kserve
from tdask.frontdoor.core import EXTENSIONS, SERVER_NAME, FrontDoorCore
from tdask.session import RemoteOperator

HEADER_LENGTH = "Inference-Header-Content-Length"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def _error(error: BaseException) -> web.Response:
    status, _ = kserve.status_of(error)
    return _json({"error": str(error)}, status)


def decode_infer(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The request's JSON header and its input tensors (JSON ``data`` or binary data after the header)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise InvalidRequestError(f"{HEADER_LENGTH} {header_length!r} does not fit the body of {len(body)} bytes")
        head, binary = memoryview(body)[:n], memoryview(body)[n:]
    else:
        head, binary = memoryview(body), memoryview(b"")
    try:
        request = json.loads(bytes(head))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise InvalidRequestError("the request body must be a JSON object with 'inputs'")
    specs = request.get("inputs")
    if not isinstance(specs, list):
        raise InvalidRequestError("the request needs 'inputs', a list of tensors")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidRequestError("each input needs a non-empty 'name'")
        name = spec["name"]
        if name in inputs:
            raise InvalidRequestError(f"input {name!r} is given twice")
        shape = kserve.shape_of(spec.get("shape"), name)
        datatype = spec.get("datatype")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"input {name!r}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidRequestError(f"input {name!r}: binary_data_size {size!r} does not fit the "
                                          f"{len(binary) - offset} bytes of binary data left")
            inputs[name] = kserve.from_bytes(binary[offset:offset + size], datatype, shape, name)
            offset += size
        elif "data" in spec:
            inputs[name] = kserve.from_values(spec["data"], datatype, shape, name)
        else:
            raise InvalidRequestError(f"input {name!r} has neither 'data' nor binary data")
    if offset != len(binary):
        raise InvalidRequestError(f"{len(binary) - offset} bytes of binary data belong to no input")
    return request, inputs


def encode_infer(request: dict[str, Any], op: RemoteOperator, request_id: str,
                 outputs: dict[str, np.ndarray]) -> web.Response:
    """The answer: JSON ``data``, or binary data after the JSON where the client asked for it."""
    params = request.get("parameters") or {}
    binary_default = params.get("binary_data_output") is True
    wanted = request.get("outputs")
    if wanted is None:
        chosen = [(name, binary_default) for name in outputs]
    else:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                   for o in wanted):
            raise InvalidRequestError("'outputs' must be a list of objects with a 'name'")
        chosen = []
        for o in wanted:
            if o["name"] not in outputs:
                raise InvalidRequestError(f"model {op.name!r} has no output {o['name']!r} "
                                          f"(outputs: {', '.join(sorted(outputs))})")
            binary = (o.get("parameters") or {}).get("binary_data", binary_default)
            chosen.append((o["name"], binary is True))
    tensors, blobs = [], []
    for name, binary in chosen:
        arr = outputs[name]
        tensor = kserve.tensor_metadata(name, arr)
        if binary:
            blob = arr.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = arr.reshape(-1).tolist()
        tensors.append(tensor)
    answer = {"model_name": op.name, "model_version": str(op.version), "outputs": tensors}
    if request.get("id") is not None:
        answer["id"] = str(request["id"])
    head = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return web.Response(body=head, content_type="application/json")
    response = web.Response(body=b"".join([head, *blobs]), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(head))
    return response


def generate_inputs(payload: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Triton's generate extension: the body's fields other than ``id`` and ``parameters`` are the inputs, by name,
    as JSON values (a scalar or a list), of the datatypes the operator declares (else what the values are)."""
    declared = {t["name"]: t for t in (metadata or {}).get("inputs", [])}
    inputs: dict[str, np.ndarray] = {}
    for name, value in payload.items():
        if name in ("id", "parameters"):
            continue
        spec = declared.get(name)
        datatype = spec["datatype"] if spec else kserve.datatype_of(np.asarray(value).dtype)
        values = value if isinstance(value, list) else [value]
        shape = (len(values),) if not spec or len(spec.get("shape", [])) != 0 else ()
        if not spec and np.asarray(values).ndim > 1:
            shape = np.asarray(values).shape
        inputs[name] = kserve.from_values(values if shape else value, datatype, shape, name)
    return inputs


def generate_body(op: RemoteOperator, request_id: str | None, outputs: dict[str, np.ndarray]) -> bytes:
    """One response of Triton's generate extension: the outputs as JSON values by name."""
    event: dict[str, Any] = {"model_name": op.name, "model_version": str(op.version)}
    if request_id is not None:
        event["id"] = request_id
    for name, arr in outputs.items():
        event[name] = arr.tolist()
    return json.dumps(event, separators=(",", ":")).encode()


class BodyTimeout(TimeoutError):
    """A request body that did not fully arrive within ``tdask.frontdoor.body-timeout``: 408."""


class HttpFrontDoor:
    """The routes of the KServe v2 REST protocol over a :class:`FrontDoorCore`."""

    def __init__(self, core: FrontDoorCore, max_body_bytes: int) -> None:
        self.core = core
        self.max_body_bytes = max_body_bytes
        # request bodies being received or held, over all connections: a bound no set of clients can exceed
        self.receiving_limit = int(config.get("frontdoor.receiving-bytes"))
        self.receiving = 0
        self.body_timeout = config.seconds("frontdoor.body-timeout")
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors])
        r = self.app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.server_ready)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/models/stats", self.stats)
        r.add_post("/v2/repository/index", self.index)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_get(prefix + "/stats", self.stats)
            r.add_post(prefix + "/infer", self.infer)
            r.add_post(prefix + "/generate", self.generate)
            r.add_post(prefix + "/generate_stream", self.generate_stream)
        r.add_get("/metrics", self.metrics)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every failure as the protocol's error body; aiohttp's own (404, 405, 413) included."""
        try:
            return await handler(request)
        except TdaskError as e:
            return _error(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _json({"error": e.reason if e.status != 413 else
                          f"the request body is over the front door's limit of {self.max_body_bytes} bytes"},
                         e.status)

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def server_ready(self, request: web.Request) -> web.Response:
        ready = await self.core.server_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": SERVER_NAME, "version": self.core.version, "extensions": EXTENSIONS})

    async def model_metadata(self, request: web.Request) -> web.Response:
        m = request.match_info
        return _json(await self.core.metadata(m["model"], m.get("version")))

    async def model_ready(self, request: web.Request) -> web.Response:
        m = request.match_info
        ready = await self.core.ready(m["model"], m.get("version"))
        return _json({"name": m["model"], "ready": ready}, 200 if ready else 400)

    async def stats(self, request: web.Request) -> web.Response:
        m = request.match_info
        if "model" in m:
            await self.core.operator(m["model"], m.get("version"))  # 404 for a model not deployed
        return _json({"model_stats": self.core.statistics(m.get("model"), m.get("version"))})

    async def index(self, request: web.Request) -> web.Response:
        return _json(await self.core.index())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.core.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _reserve(self, request: web.Request) -> int:
        """Room for this request's body among all bodies received at once (one body may always arrive)."""
        size = request.content_length if request.content_length is not None else self.max_body_bytes
        if self.receiving and self.receiving + size > self.receiving_limit:
            raise OverloadedError(f"the front door is receiving {self.receiving} bytes of request bodies; "
                                  f"{size} more would pass its limit of {self.receiving_limit} "
                                  "(tdask.frontdoor.receiving-bytes): try again")
        self.receiving += size
        return size

    async def infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        m = request.match_info
        op = None
        request_id = None
        reserved = 0
        try:
            reserved = self._reserve(request)
            try:
                body = await self._body(request)
            except BodyTimeout as late:
                self.core.record("http", op, "408", False, started, request_id, late)
                return _json({"error": str(late)}, 408)
            op = await self.core.operator(m["model"], m.get("version"))
            header, inputs = decode_infer(body, request.headers.get(HEADER_LENGTH))
            request_id = header.get("id")
            if request_id is not None and not isinstance(request_id, str):
                raise InvalidRequestError("'id' must be a string")
            params = header.get("parameters") or {}
            if not isinstance(params, dict):
                raise InvalidRequestError("'parameters' must be an object")
            op, outputs, request_id = await self.core.infer("http", m["model"], m.get("version"), inputs, params,
                                                            request_id)
            response = encode_infer(header, op, request_id, outputs)
        except web.HTTPException as e:  # the body was over the limit
            self.core.record("http", op, str(e.status), False, started, request_id, e)
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the client's answer, never the server's end
            response = _error(e)
            self.core.record("http", op, str(response.status), False, started, request_id, e)
            return response
        finally:
            self.receiving -= reserved
        self.core.record("http", op, "200", True, started, request_id)
        return response

    async def _body(self, request: web.Request) -> bytes:
        try:
            async with compat.timeout(self.body_timeout):
                return await request.read()
        except TimeoutErrors:
            raise BodyTimeout(f"the request body did not arrive within {self.body_timeout:g} s "
                              "(tdask.frontdoor.body-timeout)") from None

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """Triton's generate extension: JSON in, the single (or last) response's outputs as JSON out."""
        return await self._generate(request, streamed=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        """Triton's generate extension, streamed: each response as a server-sent event as the operator sends it;
        an error after the first one is an event with ``error``."""
        return await self._generate(request, streamed=True)

    async def _generate(self, request: web.Request, streamed: bool) -> web.StreamResponse:
        started = time.perf_counter()
        m = request.match_info
        op = None
        request_id = None
        reserved = self._reserve(request)
        response: web.StreamResponse | None = None
        sent = 0
        last: dict[str, np.ndarray] | None = None
        try:
            try:
                body = await self._body(request)
            finally:
                self.receiving -= reserved
            op = await self.core.operator(m["model"], m.get("version"))
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
            if not isinstance(payload, dict):
                raise InvalidRequestError("the request body must be a JSON object of inputs by name")
            request_id = payload.get("id")
            if request_id is not None and not isinstance(request_id, str):
                raise InvalidRequestError("'id' must be a string")
            params = payload.get("parameters") or {}
            if not isinstance(params, dict):
                raise InvalidRequestError("'parameters' must be an object")
            inputs = generate_inputs(payload, op.record.get("metadata"))
            op, responses, rid = await self.core.stream(m["model"], m.get("version"), inputs, params, request_id)
            protocol = "http_stream" if streamed else "http"
            async with responses:
                async for result in responses:
                    last = self.core.outputs_of(op.name, result)
                    self.core.responded(protocol, op, started, sent == 0)
                    sent += 1
                    if not streamed:
                        if sent > 1:
                            raise InvalidRequestError(f"model {op.name!r} answers request {rid} with several "
                                                      "responses: use generate_stream")
                        continue
                    if response is None:
                        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                               "Cache-Control": "no-cache"})
                        await response.prepare(request)
                    await response.write(b"data: " + generate_body(op, request_id, last) + b"\n\n")
        except BodyTimeout as late:
            self.core.record("http", op, "408", False, started, request_id, late)
            return _json({"error": str(late)}, 408)
        except (ConnectionResetError, asyncio.CancelledError):  # the client went away: its stream was cancelled
            self.core.record("http", op, "499", False, started, request_id, None)
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the client's answer
            status = str(kserve.status_of(e)[0])
            self.core.record("http", op, status, False, started, request_id, e)
            if response is None:
                return _error(e)
            await response.write(b"data: " + json.dumps({"error": str(e)}).encode() + b"\n\n")
            return response
        self.core.record("http", op, "200", True, started, request_id)
        if streamed:
            if response is None:  # ended without a response: an empty event stream
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
            await response.write_eof()
            return response
        if last is None:
            raise InvalidRequestError(f"model {m['model']!r} ended request {request_id} without a response")
        return web.Response(body=generate_body(op, request_id, last), content_type="application/json")
