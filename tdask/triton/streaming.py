"""Streamed requests to a Triton server's decoupled models over ``ModelStreamInfer`` calls made with Triton's
generated gRPC stubs (shipped with ``tritonclient``). A call carries one request at a time, so that cancelling the
call cancels that request in Triton; each request asks for Triton's empty final response, which tells the end of
its responses, and a call whose request ended carries a later one (opening a call costs two threads' start, 0.7 ms
of the event loop per request when every request had one). A request that stops early cancels its call, which is
not reused. Inputs that lie in shared memory are named, not sent (:meth:`tdask.triton.client.TritonModelClient.stream`).

The calls use grpcio's blocking API, each read by a thread of its own that hands responses to the event loop in
batches (one wake-up for all that arrived meanwhile): grpcio's asyncio API costs more per response (what it
measured: benchmarks/README.md, streaming). The thread reads a response only when fewer than
``tdask.request.stream-window`` wait unread: beyond them, gRPC's flow control holds Triton back, not this
process's memory."""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from tdask import config
from tdask.errors import InvalidRequestError, TritonError
from tdask.triton.http import InputRegion, triton_error

FINAL = "triton_final_response"


def stream_request(model: str, inputs: dict[str, np.ndarray], parameters: dict[str, Any] | None,
                   request_id: str, model_version: str = "",
                   in_regions: dict[str, InputRegion] | None = None) -> service_pb2.ModelInferRequest:
    """A ``ModelInferRequest`` with Triton's empty final response asked for; inputs named in ``in_regions``
    are read from shared memory, the others sent as raw contents."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version=model_version, id=request_id)
    for name, array in inputs.items():
        datatype = np_to_triton_dtype(array.dtype) if isinstance(array, np.ndarray) else None
        if datatype is None or datatype == "BYTES":
            raise InvalidRequestError(f"input {name!r} must be a numeric numpy.ndarray, got "
                                      f"{getattr(array, 'dtype', type(array).__name__)}")
        tensor = request.inputs.add(name=name, datatype=datatype)
        tensor.shape.extend(array.shape)
        if in_regions and name in in_regions:
            where = in_regions[name]
            tensor.parameters["shared_memory_region"].string_param = where.region
            tensor.parameters["shared_memory_byte_size"].int64_param = array.nbytes
            tensor.parameters["shared_memory_offset"].int64_param = where.offset
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for key, value in (parameters or {}).items():
        param = request.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def response_outputs(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray] | None:
    """A response's outputs as arrays (views of its message); None for an empty (final) response."""
    if not response.outputs:
        return None
    outputs = {}
    for i, tensor in enumerate(response.outputs):
        dtype = triton_to_np_dtype(tensor.datatype)
        outputs[tensor.name] = np.frombuffer(response.raw_output_contents[i], dtype).reshape(tuple(tensor.shape))
    return outputs


_END = object()  # ends a call's requests; also what its reader leaves after the last response


class _Call:
    """One ``ModelStreamInfer`` call: grpcio's threads send what :meth:`send` queues; a thread of this call reads
    the responses into a buffer the event loop drains (:meth:`read`), at most ``capacity`` of them unread."""

    def __init__(self, stub: Any, capacity: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.ModelStreamInfer(iter(self._requests.get, _END))
        self._buffer: collections.deque = collections.deque()
        self._room = threading.Semaphore(max(1, capacity))  # a slot per response read and not yet drained
        self.most_buffered = 0  # the most responses that waited unread
        self._waiter: asyncio.Future | None = None
        self._lock = threading.Lock()
        self._wake_pending = False
        threading.Thread(target=self._read_all, name="tdask-triton-stream", daemon=True).start()

    def _read_all(self) -> None:
        try:
            while True:
                self._room.acquire()  # released as the loop drains, and once by end()
                response = next(self._call, _END)
                self._arrived(response)
                if response is _END:
                    return
        except grpc.RpcError as e:
            self._arrived(e)

    def _arrived(self, item: Any) -> None:
        self._buffer.append(item)
        self.most_buffered = max(self.most_buffered, len(self._buffer))
        with self._lock:
            if self._wake_pending:  # the loop has not drained the last wake-up's yet: it takes this one too
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop closed: nobody reads any more
            pass

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, request: service_pb2.ModelInferRequest) -> None:
        self._requests.put(request)

    async def read(self) -> Any:
        """The next response, ``_END`` after the last one, or the call's ``grpc.RpcError``."""
        while not self._buffer:
            self._waiter = self._loop.create_future()
            if self._buffer:  # arrived between the check and the future
                break
            await self._waiter
        self._room.release()
        return self._buffer.popleft()

    def reusable(self) -> bool:
        """Whether another request may go on this call: it is open and nothing of the last one waits unread."""
        return not self._buffer and not self._call.done()

    def end(self, cancel: bool) -> None:
        """No more requests; ``cancel``: the request in Triton too. A reader waiting for room reads on, to
        the call's end (nothing comes after a final response but the end)."""
        self._requests.put(_END)
        if cancel:
            self._call.cancel()
        self._room.release()


class TritonStreams:
    """Streamed requests to one Triton server's gRPC port ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._idle: list[_Call] = []  # calls whose last request ended: later requests go on them
        self.most_buffered = 0  # the most responses that ever waited unread in this process (tests read it)
        self.calls_opened = self.calls_cancelled = 0  # (tests read them)

    def _stubs(self) -> Any:
        if self._stub is None:  # made on first use
            self._channel = grpc.insecure_channel(self.url, options=[("grpc.max_receive_message_length", -1),
                                                                     ("grpc.max_send_message_length", -1)])
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def _call(self) -> _Call:
        """A ``ModelStreamInfer`` call for one request: one whose last request ended, or a new one."""
        while self._idle:
            call = self._idle.pop()
            if call.reusable():
                return call
            call.end(cancel=True)
        return self._new_call()

    def _new_call(self) -> _Call:
        self.calls_opened += 1
        return _Call(self._stubs(), int(config.get("request.stream-window")))

    async def stream(self, model: str, inputs: dict[str, np.ndarray], *, parameters: dict | None = None,
                     request_id: str = "", model_version: str = "", in_regions: dict[str, InputRegion] | None = None,
                     ) -> AsyncIterator[tuple[dict[str, np.ndarray] | None, bool]]:
        """``(outputs or None, final)`` for each response of the request, the last one final. Closing the
        iterator early cancels the request in Triton."""
        request = stream_request(model, inputs, parameters, request_id, model_version, in_regions)
        call = self._call()
        final = ended = False
        try:
            call.send(request)
            while not final:
                response = await call.read()
                if response is _END:
                    raise TritonError(f"{model}: Triton ended the stream of request {request_id} without its final "
                                      "response", status="StatusCode.OK")
                if isinstance(response, grpc.RpcError):
                    raise triton_error(model, response.details() or str(response), str(response.code()))
                if response.error_message:  # the request's end too
                    raise triton_error(model, response.error_message, "")
                infer = response.infer_response
                if infer.id != request.id:  # never another request's response as this one's
                    raise TritonError(f"{model}: Triton answered request {request.id!r} with a response of request "
                                      f"{infer.id!r}", status="StatusCode.OK")
                final = FINAL in infer.parameters and infer.parameters[FINAL].bool_param
                yield response_outputs(infer), final
            ended = True  # the request's responses were all read: its call can carry another
        finally:
            self.most_buffered = max(self.most_buffered, call.most_buffered)
            if ended and self._channel is not None and len(self._idle) < int(config.get("triton.idle-stream-calls")):
                self._idle.append(call)
            else:
                call.end(cancel=not final)  # a reader that stopped early cancels the request in Triton
                self.calls_cancelled += not final

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for call in idle:
            call.end(cancel=True)
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            channel.close()
