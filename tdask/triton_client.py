"""A thin async client for the models of one Triton server, over one long-lived gRPC channel.

Tensors travel inside the gRPC messages for now. Large tensors are meant to move through
Triton's system shared memory later: that will slot in where :meth:`TritonModelClient._input`
builds an input and where outputs are read back, without changing :meth:`infer`'s signature.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tdask.errors import InvalidRequestError, TritonError

logger = logging.getLogger(__name__)


def _triton_error(model: str, exc: InferenceServerException) -> TritonError:
    """Keep Triton's own message; expose its status (e.g. ``StatusCode.UNAVAILABLE``) too."""
    error = TritonError(f"{model}: {exc.message()}")
    error.status = exc.status()  # type: ignore[attr-defined]
    return error


class TritonModelClient:
    """Async inference against one Triton server, given its gRPC ``host:port``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: grpcclient.InferenceServerClient | None = None

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        # Created lazily so it binds to the event loop that first uses it.
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    @staticmethod
    def _input(name: str, array: Any) -> grpcclient.InferInput:
        if not isinstance(array, np.ndarray):
            raise InvalidRequestError(
                f"input {name!r} must be a numpy.ndarray, got {type(array).__name__}"
            )
        datatype = np_to_triton_dtype(array.dtype)
        if datatype is None or (datatype == "BYTES" and array.dtype.kind not in "OSU"):
            raise InvalidRequestError(f"input {name!r} has unsupported dtype {array.dtype}")
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        return tensor

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        parameters: dict | None = None,
        request_id: str = "",
        outputs: list[str] | None = None,
        model_version: str = "",
    ) -> dict[str, np.ndarray]:
        """Run one request; return every output (or the named ones) as numpy arrays."""
        infer_inputs = [self._input(name, array) for name, array in inputs.items()]
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
        try:
            result = await self.client.infer(
                model,
                infer_inputs,
                model_version=model_version,
                outputs=requested,
                request_id=request_id,
                parameters=parameters or None,
            )
        except InferenceServerException as exc:
            raise _triton_error(model, exc) from exc
        names = outputs or [out.name for out in result.get_response().outputs]
        arrays: dict[str, np.ndarray] = {}
        for name in names:
            array = result.as_numpy(name)
            if array is None:
                raise TritonError(f"{model}: response has no output {name!r}")
            arrays[name] = array
        return arrays

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
