"""Fuzz: 1,000 malformed HTTP bodies and 1,000 malformed gRPC requests against the front door. Each gets the status its
kind of mistake calls for, with a message; valid requests sent between them keep getting correct answers."""

from __future__ import annotations

import asyncio
import json
import random

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tdask.frontdoor import FrontDoor

pytestmark = pytest.mark.slow

VALID = {"inputs": [{"name": "input", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]}]}


@pytest.fixture(scope="module")
def door(loop, session):
    front = loop.run(FrontDoor(session, http_port=0, grpc_port=0).start())
    yield front
    loop.run(front.close())


def _http_cases(rng: random.Random, n: int) -> list[tuple[str, bytes, dict, int]]:
    """(path, body, headers, expected status) of ``n`` malformed requests of many kinds."""
    path = "/v2/models/encoder_decoder/infer"
    valid = json.dumps(VALID).encode()

    def tensor(**change) -> bytes:
        t = {"name": "input", "shape": [3], "datatype": "INT64", "data": [1, 2, 3], **change}
        return json.dumps({"inputs": [{k: v for k, v in t.items() if v is not ...}]}).encode()

    kinds = [
        lambda: (path, rng.randbytes(rng.randint(0, 300)), {}, 400),  # not JSON at all
        lambda: (path, valid[:rng.randint(0, len(valid) - 1)], {}, 400),  # cut short
        lambda: (path, json.dumps(rng.choice([[], 1, "x", None, True, {"inputs": {}}, {"inputs": 5},
                                              {"no": "inputs"}])).encode(), {}, 400),
        lambda: (path, tensor(datatype=rng.choice(["INT32", "FP32", "BYTES", "int64", "", 7, None])), {}, 400),
        lambda: (path, tensor(shape=rng.choice([[-1], [2], [4], "3", [3.5], [[3]], [1, 3, 1], None, [True]])),
                 {}, 400),
        lambda: (path, tensor(data=rng.choice([["a", "b", "c"], [1.5, 2, 3], [[1, 2], [3]], None, "123",
                                               [1, 2], [2**70, 1, 1], {"a": 1}])), {}, 400),
        lambda: (path, tensor(name=rng.choice(["", None, 5, "other"])), {}, 400),
        lambda: (path, tensor(data=..., parameters={"binary_data_size": rng.randint(1, 10**12)}), {}, 400),
        lambda: (path, tensor(data=..., parameters={"binary_data_size": 24}) + rng.randbytes(rng.randint(0, 23)),
                 {"Inference-Header-Content-Length": str(len(tensor(data=..., parameters={"binary_data_size": 24})))},
                 400),
        lambda: (path, valid, {"Inference-Header-Content-Length": rng.choice(["-5", "x", str(10**9), "1e3"])}, 400),
        lambda: (path, json.dumps({**VALID, "outputs": [{"name": rng.choice(["nope", "input"])}]}).encode(), {}, 400),
        lambda: (path, json.dumps({**VALID, "parameters": rng.choice([[1], "p", {"k": [1]}, {"k": {"a": 1}},
                                                                      {"timeout": -1}])}).encode(), {}, 400),
        lambda: (f"/v2/models/{rng.choice(['nope', 'x' * 200, 'encoder%00'])}/infer", valid, {}, 404),
        lambda: (f"/v2/models/encoder_decoder/versions/{rng.choice(['9', 'x', '-1', '0'])}/infer", valid, {}, 404),
    ]
    return [rng.choice(kinds)() for _ in range(n)]


def _grpc_cases(rng: random.Random, n: int) -> list[tuple[pb.ModelInferRequest | bytes, grpc.StatusCode]]:
    def request(model: str = "encoder_decoder", version: str = "", datatype: str = "INT64", shape=(3,),
                raw: list[bytes] | None = None, typed: list[int] | None = None, name: str = "input",
                extra_raw: int = 0) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name=model, model_version=version)
        t = r.inputs.add(name=name, datatype=datatype, shape=list(shape))
        if typed is not None:
            t.contents.int64_contents.extend(typed)
        else:
            r.raw_input_contents.extend(raw if raw is not None else [np.arange(3, dtype=np.int64).tobytes()])
            r.raw_input_contents.extend([b"x"] * extra_raw)
        return r

    bad = grpc.StatusCode.INVALID_ARGUMENT
    kinds = [
        lambda: (rng.randbytes(rng.randint(1, 200)), None),  # not a protobuf (or, rarely, one that parses)
        lambda: (request(datatype=rng.choice(["INT32", "FP32", "BYTES", "int64", "", "FP16"])), bad),
        lambda: (request(shape=rng.choice([(2,), (4,), (1, 3, 1), (), (3, 0)])), bad),
        lambda: (request(raw=[rng.randbytes(rng.choice([0, 5, 23, 25, 48]))]), bad),
        lambda: (request(extra_raw=rng.randint(1, 3)), bad),
        lambda: (request(typed=[1, 2, 3][:rng.randint(0, 2)]), bad),
        lambda: (request(name=rng.choice(["", "other"])), bad),
        lambda: (request(model=rng.choice(["nope", "", "x" * 300])), grpc.StatusCode.NOT_FOUND),
        lambda: (request(version=rng.choice(["7", "x", "-1"])), grpc.StatusCode.NOT_FOUND),
    ]
    return [rng.choice(kinds)() for _ in range(n)]


def test_malformed_http_and_grpc_requests_get_their_status_and_valid_ones_keep_succeeding(door):
    import aiohttp

    rng = random.Random(1234)
    http_cases = _http_cases(rng, 1000)
    grpc_cases = _grpc_cases(rng, 1000)

    async def run() -> tuple[list, list, int]:
        wrong_http, wrong_grpc, valid_ok = [], [], 0
        limit = asyncio.Semaphore(16)
        async with aiohttp.ClientSession(door.http_url) as http:
            async def one_http(i: int, path: str, body: bytes, headers: dict, expected: int) -> None:
                nonlocal valid_ok
                async with limit:
                    async with http.post(path, data=body, headers=headers) as r:
                        answer = await r.read()
                        if r.status != expected or b'"error"' not in answer:
                            wrong_http.append((i, path, body[:200], headers, r.status, answer[:300]))
                    if i % 10 == 0:  # a valid request between the malformed ones
                        async with http.post("/v2/models/encoder_decoder/infer", json=VALID) as r:
                            if r.status == 200 and (await r.json())["outputs"][0]["data"] == [1, 2, 3]:
                                valid_ok += 1

            await asyncio.gather(*(one_http(i, *case) for i, case in enumerate(http_cases)))

        async with grpc.aio.insecure_channel(door.grpc_address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)

            async def one_grpc(i: int, request: pb.ModelInferRequest | bytes, expected: grpc.StatusCode) -> None:
                nonlocal valid_ok
                async with limit:
                    try:
                        if isinstance(request, bytes):
                            await raw(request)
                        else:
                            await stub.ModelInfer(request)
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as e:
                        code = e.code()
                        if not e.details():
                            wrong_grpc.append((i, "no message", code))
                    if code != expected and not (expected is None and code in (
                            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)):
                        wrong_grpc.append((i, str(request)[:200], code, expected))
                    if i % 10 == 0:
                        good = pb.ModelInferRequest(model_name="encoder_decoder")
                        good.inputs.add(name="input", datatype="INT64", shape=[3])
                        good.raw_input_contents.append(np.arange(3, dtype=np.int64).tobytes())
                        answer = await stub.ModelInfer(good)
                        if np.array_equal(np.frombuffer(answer.raw_output_contents[0], np.int64), np.arange(3)):
                            valid_ok += 1

            await asyncio.gather(*(one_grpc(i, *case) for i, case in enumerate(grpc_cases)))
        return wrong_http, wrong_grpc, valid_ok

    wrong_http, wrong_grpc, valid_ok = asyncio.run(run())
    assert wrong_http == []
    assert wrong_grpc == []
    assert valid_ok == 100 + 100
