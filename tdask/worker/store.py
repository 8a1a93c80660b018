"""Outputs kept on a worker until the future that names them is released (or expires), and inputs that name them."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from tdask import config
from tdask.errors import InvalidRequestError, ReplicaUnavailableError
from tdask.tensors import TensorRef, from_wire, is_array

Fetch = Callable[[str, list[str]], Awaitable[dict[str, Any]]]  # (worker, keys) -> tensors kept there


class OutputStore:
    """Per-worker-process store of kept outputs, with a TTL (``tdask.transfer.store-ttl``) against leaks."""

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

    def get_many(self, keys: Any) -> dict[str, Any]:
        """Tensors by key, for a fetch from another process (the keys as they came off the wire)."""
        if not isinstance(keys, (list, tuple)) or not all(isinstance(key, str) for key in keys):
            raise InvalidRequestError(f"a fetch names its tensors by a list of keys, got {keys!r:.100}")
        return {key: self.get(key) for key in keys}

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

    async def resolve(self, inputs: dict[str, Any], fetch: Fetch) -> dict[str, Any]:
        """Replace references by tensors: kept here, or fetched (``fetch``) straight from the worker that keeps
        them. A reference whose tensor does not match the shape and dtype it declares is refused."""
        remote: dict[str, list[tuple[str, str]]] = defaultdict(list)
        refs: dict[str, TensorRef] = {}
        resolved = {}
        for name, value in inputs.items():
            value = from_wire(value)
            if isinstance(value, TensorRef):
                refs[name] = value
                if value.worker == self.address:
                    resolved[name] = self.get(value.key)
                else:
                    remote[value.worker].append((name, value.key))
            elif is_array(value):
                resolved[name] = value
            else:
                raise InvalidRequestError(f"input {name!r} is not a tensor ({type(value).__name__})")
        for address, wanted in remote.items():
            try:
                got = await fetch(address, [key for _, key in wanted])
            except ReplicaUnavailableError as e:
                raise ReplicaUnavailableError(f"cannot fetch kept tensors from worker {address}: {e}") from e
            for name, key in wanted:
                resolved[name] = got[key]
        for name, ref in refs.items():
            value = resolved[name]
            if tuple(value.shape) != tuple(ref.shape) or str(value.dtype) != ref.dtype:
                raise InvalidRequestError(
                    f"input {name!r}: the tensor referenced declares shape {tuple(ref.shape)} {ref.dtype}, "
                    f"but holds {tuple(value.shape)} {value.dtype}"
                )
        return resolved
