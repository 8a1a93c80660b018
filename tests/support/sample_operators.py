"""Small Python operators used by the tests (found via ``repository=tests/support``)."""

from __future__ import annotations

import asyncio
import os

import numpy as np

from tdask import InvalidRequestError, Operator, Request


class Echo(Operator):
    """Answers with its input and the pid that did the work."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            await request.respond({"output": request.input("input"), "pid": np.array([os.getpid()])})


class Sleepy(Operator):
    """Sleeps ``seconds`` (a request parameter) without using the CPU, then echoes."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            await asyncio.sleep(float(request.parameters.get("seconds", 0.05)))
            await request.respond({"output": request.input("input")})


class Strict(Operator):
    """Accepts only int64 ``input``: invalid requests fail, valid ones are doubled."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            x = request.input("input")
            if x.dtype != np.int64:
                request.fail(InvalidRequestError(f"input must be int64, got {x.dtype}"))
                continue
            await request.respond({"output": x * 2})


class Broken(Operator):
    """Raises inside execute, as a buggy operator would."""

    async def execute(self, requests: list[Request]) -> None:
        raise ZeroDivisionError("division by zero in user code")


class Tally(Operator):
    """Appends ``<request id>`` to the file named by the ``log`` parameter when it starts executing,
    then sleeps ``seconds``: lets a test count how many times each request ran."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            with open(request.parameters["log"], "a") as f:
                f.write(f"{request.request_id}\n")
            await asyncio.sleep(float(request.parameters.get("seconds", 0.2)))
            await request.respond({"output": request.input("input")})


class Relay(Operator):
    """Logs ``<request id>`` to the ``log`` parameter's file, then fails the way a call to another
    operator fails when that operator's replica is gone (``ReplicaUnavailableError``)."""

    async def execute(self, requests: list[Request]) -> None:
        from tdask import ReplicaUnavailableError

        for request in requests:
            with open(request.parameters["log"], "a") as f:
                f.write(f"{request.request_id}\n")
            request.fail(ReplicaUnavailableError("replica downstream-1 of 'downstream' is not running"))


class Counter(Operator):
    """Streams ``count`` responses ``[0]``, ``[1]``, ... (``seconds`` apart), then ends; with ``fail_after`` it fails
    after that many instead."""

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            count, pause = int(request.parameters.get("count", 3)), float(request.parameters.get("seconds", 0))
            fail_after = int(request.parameters.get("fail_after", -1))
            for i in range(count):
                if i == fail_after:
                    request.fail(InvalidRequestError(f"counter gave up after {i} responses"))
                    break
                await request.send({"output": np.array([i], dtype=np.int64)})
                if pause:
                    await asyncio.sleep(pause)
            else:
                await request.end()


class Forward(Operator):
    """Streams on what ``counter`` streams it, each response doubled."""

    async def setup(self) -> None:
        self.counter = await self.context.operator("counter")

    async def execute(self, requests: list[Request]) -> None:
        for request in requests:
            async with self.counter.stream(request.inputs, request.parameters) as responses:
                async for response in responses:
                    await request.send({"output": response["output"] * 2})
            await request.end()
