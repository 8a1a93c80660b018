"""The KServe v2 (Open Inference Protocol) forms of a request and an answer, shared by the HTTP and gRPC front
doors: datatypes, tensors checked against an operator's metadata, and each tdask error's status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tdask.errors import (
    InvalidRequestError,
    OperatorNotFoundError,
    OverloadedError,
    ReplicaUnavailableError,
    RequestTimeoutError,
    RequestTooLargeError,
    TritonError,
)

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
DATATYPES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# request parameters that steer the protocol itself; never passed on to an operator
RESERVED_PARAMETERS = ("binary_data_output", "timeout", "priority", "sequence_id", "sequence_start", "sequence_end",
                       "triton_enable_empty_final_response")


# status of each error: (HTTP status, gRPC status code name); the most specific class first
_STATUS: list[tuple[type[BaseException], int, str]] = [
    (RequestTooLargeError, 413, "RESOURCE_EXHAUSTED"),
    (InvalidRequestError, 400, "INVALID_ARGUMENT"),
    (OperatorNotFoundError, 404, "NOT_FOUND"),
    (OverloadedError, 503, "UNAVAILABLE"),
    (ReplicaUnavailableError, 503, "UNAVAILABLE"),
    (RequestTimeoutError, 504, "DEADLINE_EXCEEDED"),
]
_TRITON_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
                  "RESOURCE_EXHAUSTED": 413, "UNIMPLEMENTED": 501, "CANCELLED": 499}


def status_of(error: BaseException) -> tuple[int, str]:
    """The (HTTP status, gRPC code name) a client of these protocols expects for ``error``."""
    for cls, http, grpc in _STATUS:
        if isinstance(error, cls):
            return http, grpc
    if isinstance(error, TritonError) and error.status:  # Triton's own verdict, e.g. StatusCode.INVALID_ARGUMENT
        code = str(error.status).rpartition(".")[2]
        if code in _TRITON_STATUS:
            return _TRITON_STATUS[code], code
    return 500, "INTERNAL"  # an operator's own failure


def datatype_of(dtype: np.dtype) -> str:
    """The KServe datatype of a NumPy dtype; a clear error for one the protocol cannot carry."""
    try:
        return DATATYPES[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise InvalidRequestError(f"an output of dtype {dtype} has no KServe v2 datatype") from None


def dtype_of(datatype: Any, name: str) -> np.dtype:
    if datatype == "BYTES":
        raise InvalidRequestError(f"input {name!r}: datatype BYTES is not supported by tdask (numeric tensors only)")
    try:
        return DTYPES[datatype]
    except (KeyError, TypeError):
        raise InvalidRequestError(f"input {name!r}: unknown datatype {datatype!r} "
                                  f"(one of {', '.join(DTYPES)})") from None


def shape_of(shape: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidRequestError(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def element_count(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def from_bytes(raw: bytes | memoryview, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A tensor from its raw little-endian bytes (binary data extension, gRPC ``raw_input_contents``)."""
    dtype = dtype_of(datatype, name)
    expected = element_count(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidRequestError(f"input {name!r}: {len(raw)} bytes of data for shape {list(shape)} of "
                                  f"{datatype} ({expected} bytes expected)")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def from_values(values: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A tensor from JSON ``data`` (flat or nested, row-major) or gRPC typed contents."""
    dtype = dtype_of(datatype, name)
    try:
        arr = np.asarray(values)
    except ValueError as e:  # ragged nesting
        raise InvalidRequestError(f"input {name!r}: data is not a regular array ({e})") from None
    if arr.size and (arr.dtype == object or arr.dtype.kind not in "biuf" or
                     (arr.dtype.kind == "f" and dtype.kind in "biu") or (arr.dtype.kind != "b" and dtype.kind == "b")):
        raise InvalidRequestError(f"input {name!r}: data of {arr.dtype.name} values cannot be {datatype}")
    if arr.size != element_count(shape):
        raise InvalidRequestError(f"input {name!r}: {arr.size} values for shape {list(shape)} "
                                  f"({element_count(shape)} expected)")
    try:
        with np.errstate(over="raise", invalid="raise"):
            converted = arr.astype(dtype, casting="unsafe") if arr.size else np.zeros(0, dtype)
            if arr.size and dtype.kind in "iu" and not np.array_equal(converted, arr):
                raise FloatingPointError
    except (FloatingPointError, OverflowError):
        raise InvalidRequestError(f"input {name!r}: values out of range for {datatype}") from None
    return converted.reshape(shape)


def check_inputs(model: str, metadata: Mapping[str, Any] | None, inputs: Mapping[str, np.ndarray]) -> None:
    """Inputs against what the operator declares: names (missing, extra), datatypes and shapes (-1: any size).
    An operator that declares nothing takes whatever it is sent and answers for itself."""
    declared = (metadata or {}).get("inputs") or []
    if not declared:
        return
    by_name = {spec["name"]: spec for spec in declared}
    extra = sorted(set(inputs) - set(by_name))
    if extra:
        raise InvalidRequestError(f"model {model!r}: unexpected input {', '.join(map(repr, extra))} "
                                  f"(inputs: {', '.join(sorted(by_name))})")
    missing = sorted(n for n, spec in by_name.items() if n not in inputs and not spec.get("optional"))
    if missing:
        raise InvalidRequestError(f"model {model!r}: missing input {', '.join(map(repr, missing))} "
                                  f"(got {', '.join(sorted(inputs)) or 'none'})")
    for name, arr in inputs.items():
        spec = by_name[name]
        datatype = datatype_of(arr.dtype)
        if datatype != spec["datatype"]:
            raise InvalidRequestError(f"model {model!r}: input {name!r} has datatype {datatype}, "
                                      f"expected {spec['datatype']}")
        want = [int(d) for d in spec.get("shape", [])]
        if len(want) != arr.ndim or any(w not in (-1, g) for w, g in zip(want, arr.shape, strict=True)):
            raise InvalidRequestError(f"model {model!r}: input {name!r} has shape {list(arr.shape)}, "
                                      f"expected {want} (-1: any size)")


def parameter_value(value: Any, name: str) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    raise InvalidRequestError(f"parameter {name!r} must be a bool, number or string, got {type(value).__name__}")


def operator_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The request parameters an operator receives: all but the protocol's own."""
    return {k: parameter_value(v, k) for k, v in parameters.items() if k not in RESERVED_PARAMETERS}


def timeout_of(parameters: Mapping[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter (microseconds) in seconds; None: tdask's default."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidRequestError(f"parameter 'timeout' must be a positive number of microseconds, got {value!r}")
    return value / 1e6


def tensor_metadata(name: str, arr: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}


def little_endian(arr: np.ndarray) -> np.ndarray:
    """Contiguous and little-endian, as both protocols carry raw tensor bytes."""
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)
