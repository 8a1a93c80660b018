"""Tensors on the wire: arrays travel as Dask-serialized frames, kept outputs as references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed.protocol import Serialize, to_serialize

from tdask.errors import InvalidRequestError

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


def is_wire_ref(value: Any) -> bool:
    return isinstance(value, dict) and value.get(_REF) is True


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


def to_wire(value: Any) -> Any:
    if isinstance(value, TensorRef):
        return value.to_wire()
    if isinstance(value, Serialize):
        return value
    return to_serialize(value)


def nbytes(value: Any) -> int:
    return int(getattr(value, "nbytes", 0))
