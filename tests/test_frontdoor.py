"""The KServe v2 front door over the shared hello-world deployment: stock ``tritonclient`` (HTTP and gRPC, sync
and asyncio) and ``curl`` call its operators, Triton counts exactly the requests sent, and every mistake a client
can make gets the protocol's status with a message."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import subprocess

import dask.config
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from conftest import ROOT, settled_count, triton_successes
from tritonclient.utils import InferenceServerException

from tdask import Deployment, OperatorConfig
from tdask.frontdoor import FrontDoor, kserve

SUPPORT = ROOT / "tests" / "support"


@pytest.fixture(scope="module")
def door(loop, session):
    front = loop.run(FrontDoor(session, http_port=0, grpc_port=0).start())
    yield front
    loop.run(front.close())


@pytest.fixture(scope="module")
def slow_operator(loop, client, door):
    """``Sleepy`` (sleeps ``seconds``) with four slots and no queue: a fifth request at once is refused."""
    deployment = Deployment(client, [OperatorConfig("sleepy", "sample_operators:Sleepy", repository=SUPPORT,
                                                    max_inflight=4, max_queue_size=0)])
    loop.run(deployment.start())
    yield deployment
    loop.run(deployment.stop())


def _http(door: FrontDoor) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(door.http_url.removeprefix("http://"))


def _input(module, x: np.ndarray, name: str = "input"):
    tensor = module.InferInput(name, list(x.shape), kserve.datatype_of(x.dtype))
    tensor.set_data_from_numpy(x)
    return tensor


def _decoder_count(loop, hello_world) -> int:
    return loop.run(triton_successes(hello_world.replicas, "decoder"))


def test_stock_clients_and_curl_call_every_hello_world_operator(loop, door, hello_world):
    """tritonclient HTTP and gRPC, sync and asyncio, and curl; the decoder's Triton server counts each request that
    reached it once (the pipeline's and the decoder's own)."""
    before = _decoder_count(loop, hello_world)
    x = np.arange(7, dtype=np.int64)
    sent_to_decoder = 0
    clients = ((httpclient, _http(door)), (grpcclient, grpcclient.InferenceServerClient(door.grpc_address)))
    for module, client in clients:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("encoder_decoder")
        answer = client.infer("encoder_decoder", [_input(module, x)])
        np.testing.assert_array_equal(answer.as_numpy("output"), x)
        encoded = client.infer("encoder", [_input(module, x)], parameters={"input_copies": 2})
        np.testing.assert_array_equal(encoded.as_numpy("output"), ~np.repeat(x, 2))
        assert encoded.as_numpy("input_copies").tolist() == [2]
        decoded = client.infer("decoder", [_input(module, ~np.repeat(x, 3))], parameters={"input_copies": 3})
        np.testing.assert_array_equal(decoded.as_numpy("output"), x)
        sent_to_decoder += 2
        client.close()

    async def asyncio_clients() -> list[np.ndarray]:
        answers = []
        for module, client in ((httpaio, httpaio.InferenceServerClient(door.http_url.removeprefix("http://"))),
                               (grpcaio, grpcaio.InferenceServerClient(door.grpc_address))):
            results = await asyncio.gather(*(client.infer("encoder_decoder", [_input(module, x + i)])
                                             for i in range(10)))
            answers += [r.as_numpy("output") - i for i, r in enumerate(results)]
            await client.close()
        return answers

    for answer in asyncio.run(asyncio_clients()):
        np.testing.assert_array_equal(answer, x)
    sent_to_decoder += 20
    body = json.dumps({"id": "curl-1", "inputs": [{"name": "input", "shape": [3], "datatype": "INT64",
                                                   "data": [5, 6, 7]}]})
    out = subprocess.run([shutil.which("curl") or "curl", "-s", "-X", "POST", "-d", body,
                          f"{door.http_url}/v2/models/encoder_decoder/infer"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert json.loads(out) == {"model_name": "encoder_decoder", "model_version": "1", "id": "curl-1", "outputs": [
        {"name": "output", "datatype": "INT64", "shape": [3], "data": [5, 6, 7]}]}
    sent_to_decoder += 1
    expected = before + sent_to_decoder
    assert settled_count(lambda: _decoder_count(loop, hello_world), expected) == expected


def test_metadata_comes_from_tritons_config_and_from_what_python_operators_declare(door):
    client = _http(door)
    encoder = client.get_model_metadata("encoder")
    assert encoder["platform"] == "python"  # Triton's own metadata of the loaded model
    assert encoder["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1]}]
    assert {o["name"] for o in encoder["outputs"]} == {"output", "input_copies"}
    pipeline = grpcclient.InferenceServerClient(door.grpc_address).get_model_metadata("encoder_decoder", as_json=True)
    assert pipeline["inputs"] == [{"name": "input", "datatype": "INT64", "shape": ["-1"]}]
    assert client.get_model_metadata("encoder", "1")["versions"] == ["1"]
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert {"encoder", "decoder", "encoder_decoder"} <= set(index) and index["encoder"]["state"] == "READY"
    assert client.get_server_metadata()["name"] == "tdask"
    client.infer("encoder_decoder", [_input(httpclient, np.arange(3, dtype=np.int64))])
    stats = client.get_inference_statistics("encoder_decoder")["model_stats"]
    assert stats[0]["inference_stats"]["success"]["count"] >= 1


def _error(call) -> tuple[str, str]:
    """The status and message of the InferenceServerException a stock client raised."""
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def test_each_error_maps_to_the_protocols_status():
    from tdask.errors import OperatorError, RequestTooLargeError, TritonError

    assert kserve.status_of(TritonError("x", status="StatusCode.INVALID_ARGUMENT")) == (400, "INVALID_ARGUMENT")
    assert kserve.status_of(TritonError("x", status="StatusCode.UNAVAILABLE")) == (503, "UNAVAILABLE")
    assert kserve.status_of(OperatorError("bug")) == (500, "INTERNAL")
    assert kserve.status_of(RequestTooLargeError("big")) == (413, "RESOURCE_EXHAUSTED")


def test_client_mistakes_get_400_or_invalid_argument_with_the_reason(door):
    http, grpc_ = _http(door), grpcclient.InferenceServerClient(door.grpc_address)
    x = np.arange(4, dtype=np.int64)
    cases = [
        (lambda m: [_input(m, x.astype(np.int32))], "has datatype INT32, expected INT64"),
        (lambda m: [_input(m, x.reshape(2, 2))], "has shape [2, 2], expected [-1]"),
        (lambda m: [], "missing input 'input'"),
        (lambda m: [_input(m, x), _input(m, x, "extra")], "unexpected input 'extra'"),
    ]
    for inputs, message in cases:
        status, text = _error(lambda inputs=inputs: http.infer("encoder_decoder", inputs(httpclient)))
        assert status == "400" and message in text
        status, text = _error(lambda inputs=inputs: grpc_.infer("encoder_decoder", inputs(grpcclient)))
        assert status == "StatusCode.INVALID_ARGUMENT" and message in text
    for body, message in [(b'{"inputs": [', "not valid JSON"), (b"[]", "must be a JSON object"),
                          (b'{"inputs": [{"name": "input", "shape": [2], "datatype": "INT64", "data": [1]}]}',
                           "1 values for shape [2]"),
                          (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "INT64", "data": ["a"]}]}',
                           "cannot be INT64")]:
        status, answer = _post(door, "/v2/models/encoder_decoder/infer", body)
        assert status == 400 and message in answer["error"]


def _post(door: FrontDoor, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(door.http_url + path, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_unknown_models_and_versions_are_404_or_not_found(door):
    http, grpc_ = _http(door), grpcclient.InferenceServerClient(door.grpc_address)
    x = [_input(httpclient, np.arange(2, dtype=np.int64))]
    for model, version, message in [("nope", "", "no operator named 'nope'"),
                                    ("encoder", "7", "has no version 7")]:
        status, text = _error(lambda m=model, v=version: http.infer(m, x, model_version=v))
        assert status == "404" and message in text
        status, text = _error(lambda m=model, v=version: grpc_.infer(
            m, [_input(grpcclient, np.arange(2, dtype=np.int64))], model_version=v))
        assert status == "StatusCode.NOT_FOUND" and message in text
        status, text = _error(lambda m=model, v=version: http.get_model_metadata(m, v))
        assert status == "404"
    assert not http.is_model_ready("nope") and not grpc_.is_model_ready("nope")


def test_overload_is_503_or_unavailable_and_a_timeout_504_or_deadline_exceeded(door, slow_operator):
    x = np.arange(2, dtype=np.int64)

    async def one_too_many(module, make_client) -> list:
        client = make_client()
        first = asyncio.gather(*(client.infer("sleepy", [_input(module, x)], parameters={"seconds": 1.0})
                                 for _ in range(4)))
        await asyncio.sleep(0.3)  # the first four hold every slot; no queue behind them
        try:
            await client.infer("sleepy", [_input(module, x)], parameters={"seconds": 0})
            second = None
        except InferenceServerException as e:
            second = (e.status(), e.message())
        await first
        await client.close()
        return second

    status, text = asyncio.run(one_too_many(httpaio, lambda: httpaio.InferenceServerClient(
        door.http_url.removeprefix("http://"))))
    assert status == "503" and "sleepy" in text
    status, text = asyncio.run(one_too_many(grpcaio, lambda: grpcaio.InferenceServerClient(door.grpc_address)))
    assert status == "StatusCode.UNAVAILABLE"
    http = _http(door)
    # Triton's "timeout" request parameter, in microseconds
    status, text = _error(lambda: http.infer("sleepy", [_input(httpclient, x)],
                                                  parameters={"seconds": 2.0}, timeout=200_000))
    assert status == "504" and "within 0.2 s" in text
    grpc_ = grpcclient.InferenceServerClient(door.grpc_address)
    status, text = _error(lambda: grpc_.infer("sleepy", [_input(grpcclient, x)], parameters={"seconds": 2.0},
                                                   timeout=200_000))
    assert status == "StatusCode.DEADLINE_EXCEEDED"


def test_requests_over_the_size_limit_are_413_or_resource_exhausted(loop, session):
    with dask.config.set({"tdask.replica.max-request-bytes": 1000}):
        small = loop.run(FrontDoor(session, http_port=0, grpc_port=0).start())
    try:
        x = np.arange(200, dtype=np.int64)  # 1,600 bytes
        http = httpclient.InferenceServerClient(small.http_url.removeprefix("http://"))
        status, text = _error(lambda: http.infer("encoder_decoder", [_input(httpclient, x)]))
        assert status == "413" and "over the per-request limit of 1000 bytes" in text
        grpc_ = grpcclient.InferenceServerClient(small.grpc_address)
        status, text = _error(lambda: grpc_.infer("encoder_decoder", [_input(grpcclient, x)]))
        assert status == "StatusCode.RESOURCE_EXHAUSTED" and "1000 bytes" in text
        big = np.zeros((1 << 20) // 8 + 1000, dtype=np.int64)  # over the body limit itself: refused unread
        status, text = _error(lambda: http.infer("encoder_decoder", [_input(httpclient, big)]))
        assert status == "413"
        status, _ = _error(lambda: grpc_.infer("encoder_decoder", [_input(grpcclient, big)]))
        assert status == "StatusCode.RESOURCE_EXHAUSTED"
        np.testing.assert_array_equal(http.infer("encoder_decoder", [_input(httpclient, x[:100])])
                                      .as_numpy("output"), x[:100])
    finally:
        loop.run(small.close(), timeout=30)


def test_the_grpc_stream_answers_each_request_with_its_id_and_errors_in_band(door):
    client = grpcclient.InferenceServerClient(door.grpc_address)
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    try:
        for k in range(5):
            client.async_stream_infer("encoder_decoder", [_input(grpcclient, np.arange(k, dtype=np.int64))],
                                      request_id=f"r{k}", enable_empty_final_response=True)
        client.async_stream_infer("encoder_decoder", [_input(grpcclient, np.arange(3, dtype=np.int32))],
                                  request_id="bad")
        got, errors = {}, []
        for _ in range(6):
            result, error = answers.get(timeout=60)
            if error is not None:
                errors.append(str(error))
                continue
            response = result.get_response()
            assert response.parameters["triton_final_response"].bool_param  # Triton's decoupled convention
            got[response.id] = result.as_numpy("output")
    finally:
        client.stop_stream()
    assert sorted(got) == [f"r{k}" for k in range(5)]
    for k in range(5):
        np.testing.assert_array_equal(got[f"r{k}"], np.arange(k))
    assert len(errors) == 1 and "datatype INT32, expected INT64" in errors[0]


def test_metrics_count_requests_by_protocol_and_status(door):
    import urllib.request

    http = _http(door)
    http.infer("encoder_decoder", [_input(httpclient, np.arange(2, dtype=np.int64))])
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(door.grpc_address).infer(
            "encoder_decoder", [_input(grpcclient, np.arange(2, dtype=np.float32))])
    text = urllib.request.urlopen(door.http_url + "/metrics", timeout=10).read().decode()
    assert 'tdask_frontdoor_requests_total{model="encoder_decoder",protocol="http",status="200"}' in text
    assert 'tdask_frontdoor_requests_total{model="encoder_decoder",protocol="grpc",status="INVALID_ARGUMENT"}' in text
    assert "tdask_frontdoor_request_seconds_bucket" in text


def test_grpc_requests_that_are_not_protobuf_are_refused_and_the_door_keeps_serving(door):
    channel = grpc.insecure_channel(door.grpc_address)
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff\xff not a protobuf")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in info.value.details()
    unimplemented = channel.unary_unary("/inference.GRPCInferenceService/ModelConfig",
                                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        unimplemented(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()
    answer = grpcclient.InferenceServerClient(door.grpc_address).infer(
        "encoder_decoder", [_input(grpcclient, np.arange(3, dtype=np.int64))])
    np.testing.assert_array_equal(answer.as_numpy("output"), np.arange(3))


def test_bodies_received_at_once_are_bounded_and_a_body_that_stalls_is_answered_408(loop, session):
    """A client that sends its body slowly holds its share of ``receiving-bytes`` until ``body-timeout``: others
    beyond the bound get 503 at once, it gets 408, and the front door serves on."""
    import socket
    import time

    settings = {"tdask.frontdoor.receiving-bytes": 1000, "tdask.frontdoor.body-timeout": "1s"}
    with dask.config.set(settings):
        small = loop.run(FrontDoor(session, http_port=0, grpc_port=0).start())
    try:
        slow = socket.create_connection((small.host, small.http_port), timeout=30)
        slow.sendall(b"POST /v2/models/encoder_decoder/infer HTTP/1.1\r\nHost: tdask\r\n"
                     b"Content-Length: 900\r\n\r\n{")  # 1 of 900 bytes, then nothing
        deadline = time.monotonic() + 20
        while True:  # until the stalled body holds its reservation (the first tries may come before it)
            status, answer = _post(small, "/v2/models/encoder_decoder/infer", b" " * 900)
            if status == 503 or time.monotonic() > deadline:
                break
        assert status == 503 and "tdask.frontdoor.receiving-bytes" in answer["error"], (status, answer)
        reply = slow.recv(65536).decode()
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply, reply
        slow.close()
        status, answer = _post(small, "/v2/models/encoder_decoder/infer", json.dumps(
            {"inputs": [{"name": "input", "shape": [2], "datatype": "INT64", "data": [4, 5]}]}).encode())
        assert status == 200 and answer["outputs"][0]["data"] == [4, 5]
    finally:
        loop.run(small.close(), timeout=30)


def _published(loop, client) -> list[dict]:
    """The front doors in the scheduler's metadata (a closed one leaves None)."""
    from tdask.registry import FRONTDOORS

    doors = loop.run(lambda: client.get_metadata(FRONTDOORS, default={})) or {}
    return [d for d in doors.values() if d]


def test_front_doors_placed_in_the_workers_serve_every_operator_and_go_with_their_plugin(loop, client, hello_world):
    """``WorkerFrontDoors``: a front door inside every worker process; stock clients call the pipeline through each,
    the decoder's Triton server counts every request, each door publishes its counts, and unregistering the plugin
    closes them all."""
    from tdask.frontdoor import WorkerFrontDoors

    loop.run(lambda: client.register_plugin(WorkerFrontDoors()))
    try:
        where = loop.run(lambda: client.run(WorkerFrontDoors.addresses))
        assert set(where) == set(client.scheduler_info()["workers"]) and None not in where.values()
        before = _decoder_count(loop, hello_world)
        x = np.arange(5, dtype=np.int64)
        for door in where.values():
            grpc_ = grpcclient.InferenceServerClient(door["grpc"])
            answer = grpc_.infer("encoder_decoder", [_input(grpcclient, x)])
            np.testing.assert_array_equal(answer.as_numpy("output"), x)
            http = httpclient.InferenceServerClient(door["http"].removeprefix("http://"))
            decoded = http.infer("decoder", [_input(httpclient, ~np.repeat(x, 3))], parameters={"input_copies": 3})
            np.testing.assert_array_equal(decoded.as_numpy("output"), x)
            grpc_.close()
            http.close()
        expected = before + 2 * len(where)
        assert settled_count(lambda: _decoder_count(loop, hello_world), expected) == expected

        def published_grpc_oks() -> int:
            """The gRPC requests answered, as the workers' front doors publish them for the dashboard."""
            doors = {d["grpc"]: d for d in _published(loop, client)}
            return sum(doors.get(w["grpc"], {}).get("by_status", {}).get("grpc OK", 0) for w in where.values())

        assert settled_count(published_grpc_oks, len(where)) == len(where)
    finally:
        loop.run(lambda: client.unregister_worker_plugin(WorkerFrontDoors.name))
    assert set(loop.run(lambda: client.run(WorkerFrontDoors.addresses)).values()) == {None}
    assert not {d["grpc"] for d in _published(loop, client)} & {w["grpc"] for w in where.values()}
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(next(iter(where.values()))["grpc"]).is_server_live()


def test_remove_without_on_workers_is_refused_with_the_reason(capsys):
    from tdask.cli.frontdoor import main

    with pytest.raises(SystemExit) as exit_:
        main(["--remove"])
    assert exit_.value.code == 2 and "give both" in capsys.readouterr().err
