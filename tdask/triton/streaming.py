"""Streamed requests to a Triton server's decoupled models: one ``ModelStreamInfer`` call per request, over
Triton's generated gRPC stubs (shipped with ``tritonclient``), so that cancelling the call cancels the request in
Triton. Each call asks for Triton's empty final response, which tells the end of a request's responses. The next
request's call is opened when a request ends, so that its setup is not on that request's path; inputs that lie in
shared memory are named, not sent (:meth:`tdask.triton.client.TritonModelClient.stream`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

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


class TritonStreams:
    """Streamed requests to one Triton server's gRPC port ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._spare: Any = None  # a call opened ahead of the next request: its setup is not on that request's path

    def _stubs(self) -> Any:
        if self._stub is None:  # made on first use, on the loop that uses it
            self._channel = grpc.aio.insecure_channel(self.url, options=[("grpc.max_receive_message_length", -1),
                                                                         ("grpc.max_send_message_length", -1)])
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def _call(self) -> Any:
        """A ``ModelStreamInfer`` call for one request: the spare opened after the last request, or a new one."""
        call, self._spare = self._spare, None
        if call is None or call.done():
            call = self._stubs().ModelStreamInfer()
        return call

    async def stream(self, model: str, inputs: dict[str, np.ndarray], *, parameters: dict | None = None,
                     request_id: str = "", model_version: str = "", in_regions: dict[str, InputRegion] | None = None,
                     ) -> AsyncIterator[tuple[dict[str, np.ndarray] | None, bool]]:
        """``(outputs or None, final)`` for each response of the request, the last one final. Closing the
        iterator early cancels the request in Triton."""
        request = stream_request(model, inputs, parameters, request_id, model_version, in_regions)
        call = self._call()
        final = False
        try:
            await call.write(request)
            while not final:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise TritonError(f"{model}: Triton ended the stream of request {request_id} without its final "
                                      "response", status=str(await call.code()))
                if response.error_message:  # the request's end too
                    final = True
                    call.cancel()
                    raise triton_error(model, response.error_message, "")
                infer = response.infer_response
                final = FINAL in infer.parameters and infer.parameters[FINAL].bool_param
                yield response_outputs(infer), final
            await call.done_writing()
        except grpc.aio.AioRpcError as e:
            raise triton_error(model, e.details() or str(e), str(e.code())) from e
        finally:
            if not final:  # the reader stopped early: cancels the request in Triton
                call.cancel()
            if self._spare is None and self._channel is not None:
                self._spare = self._stub.ModelStreamInfer()

    async def close(self) -> None:
        if self._spare is not None:
            self._spare.cancel()
            self._spare = None
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()
