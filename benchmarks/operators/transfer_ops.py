"""Operators for the transport benchmark: a tensor made on one worker, consumed on another."""

from __future__ import annotations

import numpy as np

from tdask import Operator, Request


def _xp(device: str):
    if device == "GPU":
        import cupy

        return cupy
    return np


class Source(Operator):
    """Makes a tensor of ``nbytes`` (a request parameter) on its device and keeps it there."""

    async def setup(self) -> None:
        self.xp = _xp(self.config.device)
        self.cache: dict[int, object] = {}

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            n = int(request.parameters.get("nbytes", 8)) // 8
            if n not in self.cache:
                self.cache = {n: self.xp.arange(n, dtype=self.xp.int64)}
            await request.respond({"output": self.cache[n]})


class Sink(Operator):
    """Receives a tensor (fetched worker to worker before execute) and answers with its size and kind."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            x = request.input("input")
            on_gpu = hasattr(x, "__cuda_array_interface__")
            last = int(x[-1]) if len(x) else -1
            await request.respond({"nbytes": np.array([x.nbytes]), "on_gpu": np.array([on_gpu]),
                                   "last": np.array([last])})
