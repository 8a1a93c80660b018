"""Tensors on the wire: arrays travel as Dask-serialized frames, kept outputs as references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed.protocol import Serialize, to_serialize

from tdask import config
from tdask.errors import InvalidRequestError, RequestTooLargeError

_REF = "__tdask_ref__"


@dataclass(frozen=True)
class TensorRef:
    """An output kept on the worker that produced it; consumers fetch it from there."""

    worker: str
    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    def to_wire(self) -> dict[str, Any]:
        return {_REF: True, "worker": self.worker, "key": self.key, "shape": list(self.shape),
                "dtype": self.dtype, "nbytes": self.nbytes}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> TensorRef:
        return cls(msg["worker"], msg["key"], tuple(msg["shape"]), msg["dtype"], msg["nbytes"])


def is_array(value: Any) -> bool:
    """NumPy or any array with the array interface CuPy exposes (no CuPy import needed)."""
    return isinstance(value, np.ndarray) or hasattr(value, "__cuda_array_interface__")


def check_tensor(name: Any, value: Any) -> Any:
    """Reject what cannot be a tensor before it leaves the caller."""
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"tensor names must be non-empty strings, got {name!r}")
    if isinstance(value, (TensorRef,)) or is_array(value):
        return value
    if isinstance(value, (list, tuple, int, float, bool, np.generic)):
        arr = np.asarray(value)
        if arr.dtype == object:
            raise InvalidRequestError(f"input {name!r} is not a numeric tensor")
        return arr
    raise InvalidRequestError(f"input {name!r} must be an array, got {type(value).__name__}")


_ND = "__tdask_nd__"


def inline_threshold() -> int:
    """``tdask.transfer.inline-threshold``: outputs up to this many bytes travel with the answer."""
    return int(config.get("transfer.inline-threshold"))


def to_wire(value: Any) -> Any:
    """Small NumPy arrays ride inside the message as raw bytes (no serializer machinery);
    large ones and device arrays (CuPy: Dask's ``cuda`` serializer) travel as frames."""
    if isinstance(value, TensorRef):
        return value.to_wire()
    if isinstance(value, Serialize):
        return value
    if (isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and value.nbytes <= inline_threshold()
            and value.flags.c_contiguous):
        return {_ND: True, "dtype": value.dtype.str, "shape": list(value.shape), "data": value.data}
    return to_serialize(value)


def from_wire(value: Any) -> Any:
    """The array (or :class:`TensorRef`) a wire value stands for."""
    if isinstance(value, dict):
        if value.get(_ND) is True:
            arr = np.frombuffer(value["data"], dtype=np.dtype(value["dtype"]))
            return arr.reshape(value["shape"]).copy()  # writable, like any other input
        if value.get(_REF) is True:
            return TensorRef.from_wire(value)
    return value


def nbytes(value: Any) -> int:
    return int(getattr(value, "nbytes", 0))


def check_request_size(inputs: dict[str, Any], request_id: str, limit: int | None = None) -> None:
    """Reject a request over ``limit`` bytes, by default ``tdask.replica.max-request-bytes`` (checked by callers,
    front doors and replicas)."""
    size = sum(nbytes(v) for v in inputs.values())
    if limit is None:
        limit = int(config.get("replica.max-request-bytes"))
    if size > limit:
        raise RequestTooLargeError(
            f"request {request_id}: inputs are {size} bytes, over the per-request limit of {limit} bytes "
            "(tdask.replica.max-request-bytes)"
        )
