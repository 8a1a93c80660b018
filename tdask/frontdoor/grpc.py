"""The KServe v2 gRPC front door: Triton's ``GRPCInferenceService``, from the stubs generated for ``tritonclient``,
on grpcio's asyncio server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tdask.errors import InvalidRequestError, TdaskError
from tdask.frontdoor import kserve
from tdask.frontdoor.core import EXTENSIONS, SERVER_NAME, FrontDoorCore
from tdask.session import RemoteOperator

# typed contents field of each datatype (FP16 travels only as raw bytes)
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents"}
STREAM_INFLIGHT = 256  # requests of one stream in flight at once; beyond it the stream is read no further


def parameters_of(params: Any) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        if which is None:
            raise InvalidRequestError(f"parameter {key!r} has no value")
        out[key] = getattr(value, which)
    return out


def decode_infer(request: pb.ModelInferRequest) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Input tensors (``raw_input_contents``, one per input, or typed contents) and request parameters."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidRequestError("each input needs a non-empty name")
        if name in inputs:
            raise InvalidRequestError(f"input {name!r} is given twice")
        shape = kserve.shape_of(list(tensor.shape), name)
        if raw:
            inputs[name] = kserve.from_bytes(raw[i], tensor.datatype, shape, name)
        else:
            kserve.dtype_of(tensor.datatype, name)
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise InvalidRequestError(f"input {name!r}: {tensor.datatype} travels only in raw_input_contents")
            inputs[name] = kserve.from_values(list(getattr(tensor.contents, field)), tensor.datatype, shape, name)
    return inputs, parameters_of(request.parameters)


def encode_infer(request: pb.ModelInferRequest, op: RemoteOperator, request_id: str,
                 outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    wanted = [o.name for o in request.outputs] or list(outputs)
    response = pb.ModelInferResponse(model_name=op.name, model_version=str(op.version), id=request.id)
    for name in wanted:
        if name not in outputs:
            raise InvalidRequestError(f"model {op.name!r} has no output {name!r} (outputs: "
                                      f"{', '.join(sorted(outputs))})")
        arr = outputs[name]
        response.outputs.add(name=name, datatype=kserve.datatype_of(arr.dtype), shape=arr.shape)
        response.raw_output_contents.append(arr.tobytes())
    return response


class Malformed:
    """A request message that did not parse: answered INVALID_ARGUMENT (grpcio alone would say UNKNOWN)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _parser(message: Any) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and kin
            return Malformed(e)

    return parse


class GrpcFrontDoor(service_pb2_grpc.GRPCInferenceServiceServicer):
    """What tdask serves of ``GRPCInferenceService``; the rest answers UNIMPLEMENTED (grpcio's answer to a method
    not registered)."""

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's methods this class implements, with Triton's generated messages, parsed so that a
        malformed message is the client's INVALID_ARGUMENT."""
        handlers = {}
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        for method in service.methods:
            if method.name not in type(self).__dict__:
                continue
            behaviour = getattr(self, method.name)
            parse = _parser(getattr(pb, method.input_type.name))
            serialize = getattr(pb, method.output_type.name).SerializeToString
            if method.client_streaming:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    behaviour, request_deserializer=parse, response_serializer=serialize)
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._checked(behaviour), request_deserializer=parse, response_serializer=serialize)
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    @staticmethod
    def _checked(behaviour: Any) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.error}")
            return await behaviour(request, context)

        return call

    def __init__(self, core: FrontDoorCore) -> None:
        self.core = core

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.core.server_ready())

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.core.version, extensions=EXTENSIONS)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=await self.core.ready(request.name, request.version))

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            md = await self.core.metadata(request.name, request.version)
        except TdaskError as e:
            await _abort(context, e)
        tensors = lambda specs: [pb.ModelMetadataResponse.TensorMetadata(  # noqa: E731
            name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in specs]
        return pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"],
                                        inputs=tensors(md["inputs"]), outputs=tensors(md["outputs"]))

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        if request.name:
            try:
                await self.core.operator(request.name, request.version)
            except TdaskError as e:
                await _abort(context, e)
        response = pb.ModelStatisticsResponse()
        for s in self.core.statistics(request.name, request.version):
            stats = response.model_stats.add(name=s["name"], version=s["version"],
                                             last_inference=s["last_inference"],
                                             inference_count=s["inference_count"],
                                             execution_count=s["execution_count"])
            for kind in ("success", "fail"):
                getattr(stats.inference_stats, kind).count = s["inference_stats"][kind]["count"]
                getattr(stats.inference_stats, kind).ns = s["inference_stats"][kind]["ns"]
        return response

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for m in await self.core.index():
            response.models.add(name=m["name"], version=m["version"], state=m["state"])
        return response

    async def _infer(self, request: pb.ModelInferRequest, protocol: str) -> tuple[pb.ModelInferResponse | None,
                                                                                     BaseException | None]:
        """One request on tdask's request path: its answer, or the error to report (never raised)."""
        started = time.perf_counter()
        op = None
        try:
            op = await self.core.operator(request.model_name, request.model_version)
            inputs, params = decode_infer(request)
            op, outputs, request_id = await self.core.infer(protocol, request.model_name, request.model_version,
                                                            inputs, params, request.id or None)
            response = encode_infer(request, op, request_id, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the client's answer
            self.core.record(protocol, op, kserve.status_of(e)[1], False, started, request.id, e)
            return None, e
        self.core.record(protocol, op, "OK", True, started, request.id)
        return response, None

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        response, error = await self._infer(request, "grpc")
        if error is not None:
            await _abort(context, error)
        return response

    async def _stream(self, request: pb.ModelInferRequest,
                      put: Callable[[pb.ModelStreamInferResponse], Awaitable[None]]) -> None:
        """One request of a stream: each of its responses as the operator sends it, with its request's id; the last
        one marked ``triton_final_response`` (an empty one when the operator ended without a response) where the
        client asked for it, as Triton does for decoupled models. An error ends it in band."""
        started = time.perf_counter()
        op = None
        flag = request.parameters.get("triton_enable_empty_final_response")
        mark_final = flag is not None and flag.bool_param
        sent = 0
        try:
            op = await self.core.operator(request.model_name, request.model_version)
            inputs, params = decode_infer(request)
            op, responses, request_id = await self.core.stream(request.model_name, request.model_version, inputs,
                                                               params, request.id or None)
            final = False
            async with responses:
                async for result in responses:
                    response = encode_infer(request, op, request_id, self.core.outputs_of(op.name, result))
                    final = responses.ended
                    if mark_final:
                        response.parameters["triton_final_response"].bool_param = final
                    self.core.responded("grpc_stream", op, started, sent == 0)
                    sent += 1
                    await put(pb.ModelStreamInferResponse(infer_response=response))
            if mark_final and not final:
                response = pb.ModelInferResponse(model_name=op.name, model_version=str(op.version), id=request.id)
                response.parameters["triton_final_response"].bool_param = True
                await put(pb.ModelStreamInferResponse(infer_response=response))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the client's answer, in band
            self.core.record("grpc_stream", op, kserve.status_of(e)[1], False, started, request.id, e)
            await put(pb.ModelStreamInferResponse(
                error_message=str(e), infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id)))
            return
        self.core.record("grpc_stream", op, "OK", True, started, request.id)

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently, each answered with its responses (several for a streaming
        operator) as they come. At most ``STREAM_INFLIGHT`` requests run and as many responses wait at once:
        beyond that the stream is not read, and operators' sends wait (flow control end to end)."""
        answers: asyncio.Queue = asyncio.Queue(maxsize=STREAM_INFLIGHT)
        slots = asyncio.Semaphore(STREAM_INFLIGHT)
        running: set[asyncio.Task] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                await self._stream(request, answers.put)
            finally:
                slots.release()

        async def reader() -> None:
            try:
                async for request in requests:
                    if isinstance(request, Malformed):
                        await answers.put(pb.ModelStreamInferResponse(
                            error_message=f"malformed request message: {request.error}"))
                        continue
                    await slots.acquire()
                    task = asyncio.ensure_future(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                for _ in range(STREAM_INFLIGHT):  # every request answered
                    await slots.acquire()
            finally:  # every request answered, or the client's side of the stream failed
                done.set()
                if answers.empty():
                    answers.put_nowait(None)  # wakes the loop below

        done = asyncio.Event()
        reading = asyncio.ensure_future(reader())
        try:
            while not (done.is_set() and answers.empty()):
                answer = await answers.get()
                if answer is not None:
                    yield answer
            await reading
        finally:
            reading.cancel()
            for task in list(running):  # the client went away: its requests are cancelled upstream
                task.cancel()


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    await context.abort(getattr(grpc.StatusCode, kserve.status_of(error)[1]), str(error))
