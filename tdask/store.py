"""Outputs kept on a worker until the future that names them is released (or expires)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from tdask import config
from tdask.errors import InvalidRequestError, ReplicaUnavailableError
from tdask.tensors import TensorRef


class OutputStore:
    """Per-worker-process store of kept outputs, with a TTL as the backstop against leaks."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._data: dict[str, tuple[Any, float]] = {}

    def put(self, value: Any) -> TensorRef:
        key = uuid.uuid4().hex
        self._data[key] = (value, time.monotonic())
        self.expire()
        return TensorRef(self.address, key, tuple(int(s) for s in value.shape), str(value.dtype), int(value.nbytes))

    def get(self, key: str) -> Any:
        try:
            return self._data[key][0]
        except KeyError:
            raise InvalidRequestError(
                f"tensor {key} is no longer held by worker {self.address} (released or expired)"
            ) from None

    def release(self, keys: list[str]) -> None:
        for key in keys:
            self._data.pop(key, None)

    def expire(self) -> None:
        ttl = config.seconds("transfer.store-ttl")
        now = time.monotonic()
        if self._data and now - next(iter(self._data.values()))[1] > ttl:
            for key in [k for k, (_, t) in self._data.items() if now - t > ttl]:
                del self._data[key]

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(v, "nbytes", 0)) for v, _ in self._data.values())


async def fetch_kept(rpc: Any, address: str, keys: list[str]) -> dict[str, Any]:
    """Tensors kept on worker ``address``, by key, through its ``tdask_fetch`` handler."""
    try:
        got = await rpc(address).tdask_fetch(keys=keys)
    except OSError as e:
        raise ReplicaUnavailableError(f"cannot fetch tensors from worker {address}: {e}") from e
    if isinstance(got, dict) and got.get("status") == "uncaught-error":
        raise InvalidRequestError(str(got.get("exception")))
    return got
