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
