"""Streaming: operators answer one request with a sequence of responses, end to end, over real workers and a real
Triton server serving a decoupled model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import MODELS, OPERATORS, ROOT, SUPPORT

from tdask import Deployment, InvalidRequestError, OperatorConfig, TritonError

TEST_MODELS = ROOT / "tests" / "streaming_models"  # apart from tests/models, which is served whole elsewhere


@pytest.fixture(scope="module")
def streaming(loop, client, hello_world):
    """The hello world's streaming pair beside the shared hello world, and the sample streaming operators."""
    deployment = Deployment(client, [
        OperatorConfig("decoder_stream", "TritonCoreOperator", repository=MODELS, max_inflight=4),
        OperatorConfig("encoder_decoder_stream", "encoder_decoder:EncoderDecoderStream", repository=OPERATORS,
                       max_inflight=4),
        OperatorConfig("tally_stream", "TritonCoreOperator", repository=TEST_MODELS),
        OperatorConfig("counter", "sample_operators:Counter", repository=SUPPORT, max_inflight=8),
        OperatorConfig("forward", "sample_operators:Forward", repository=SUPPORT, max_inflight=8),
    ])
    loop.run(deployment.start(), timeout=300)
    yield deployment
    loop.run(deployment.stop(), timeout=120)


async def _collect(session, name, inputs, parameters=None, **kwargs):
    op = await session.operator(name)
    async with op.stream(inputs, parameters, **kwargs) as responses:
        got = [response async for response in responses]
        assert responses.ended
    return got


async def _replica_stats(session, name):
    op = await session.operator(name)
    await op.refresh()
    stats = await session.client.run(lambda dask_worker: dask_worker.extensions["tdask"].stats()["replicas"],
                                     workers=sorted(set(op.replicas.values())))
    return [r for per_worker in stats.values() for r in per_worker.values() if r["name"] == name]


def test_python_operator_streams_n_responses_in_order(loop, session, streaming):
    got = loop.run(_collect(session, "counter", {"input": np.zeros(1)}, {"count": 50}))
    assert [int(r["output"][0]) for r in got] == list(range(50))


def test_a_composing_operator_streams_on_what_it_receives(loop, session, streaming):
    got = loop.run(_collect(session, "forward", {"input": np.zeros(1)}, {"count": 20}))
    assert [int(r["output"][0]) for r in got] == [2 * i for i in range(20)]


def test_single_response_operator_streams_one_response(loop, session, streaming):
    x = np.arange(7, dtype=np.int64)
    got = loop.run(_collect(session, "encoder_decoder", {"input": x}))
    assert len(got) == 1
    np.testing.assert_array_equal(got[0]["output"], x)


def test_infer_on_a_streaming_operator_is_a_clear_error(loop, session, streaming):
    async def run():
        op = await session.operator("counter")
        with pytest.raises(InvalidRequestError, match="call the operator with stream"):
            await op.infer({"input": np.zeros(1)}, {"count": 3})
        decoder = await session.operator("decoder_stream")
        with pytest.raises(InvalidRequestError, match="decoupled"):
            await decoder.infer({"input": np.arange(3, dtype=np.int64)})

    loop.run(run())


def test_decoupled_triton_model_streams_chunks(loop, session, streaming):
    x = np.arange(2500, dtype=np.int64)
    got = loop.run(_collect(session, "decoder_stream", {"input": ~x}, {"chunk_size": 1000}))
    assert [len(r["output"]) for r in got] == [1000, 1000, 500]
    np.testing.assert_array_equal(np.concatenate([r["output"] for r in got]), x)


def test_decoupled_model_sends_what_tdask_delivers(loop, session, streaming, tmp_path):
    """Triton's statistics do not count a decoupled Python model's responses (2.51), so the model counts them."""
    log = tmp_path / "sent.log"
    got = loop.run(_collect(session, "tally_stream", {"input": np.zeros(1, np.int64)}, {"count": 7, "log": str(log)}))
    assert [int(r["output"][0]) for r in got] == list(range(7))
    assert log.read_text().split() == [str(i) for i in range(7)]


def test_a_large_streamed_input_reaches_triton_through_shared_memory(loop, session, streaming):
    """Inputs of tdask.triton.shared-memory-threshold bytes or more are read by Triton from a region (as infer()'s
    are), smaller ones travel in the message."""
    async def shm_calls():
        op = await session.operator("decoder_stream")
        await op.refresh()
        counts = await session.client.run(
            lambda dask_worker: sum(c.shm_calls for c in dask_worker.extensions["tdask"].triton.clients()),
            workers=sorted(set(op.replicas.values())))
        return sum(counts.values())

    x = np.arange(200_000, dtype=np.int64)
    before = loop.run(shm_calls())
    large = loop.run(_collect(session, "decoder_stream", {"input": ~x}, {"chunk_size": 50_000}))
    small = loop.run(_collect(session, "decoder_stream", {"input": ~x[:100]}, {"chunk_size": 50}))
    assert loop.run(shm_calls()) - before == 1
    np.testing.assert_array_equal(np.concatenate([r["output"] for r in large]), x)
    np.testing.assert_array_equal(np.concatenate([r["output"] for r in small]), x[:100])


@pytest.mark.parametrize("size, chunk", [(3000, 1000), (2345, 1000), (10, 3), (0, 1000)])
def test_hello_world_streaming_pipeline_gives_back_its_input(loop, session, streaming, size, chunk):
    x = np.random.default_rng(size).integers(-1000, 1000, size, dtype=np.int64)
    got = loop.run(_collect(session, "encoder_decoder_stream", {"input": x}, {"chunk_size": chunk}))
    assert [len(r["output"]) for r in got] == ([min(chunk, size - i) for i in range(0, size, chunk)] or [0])
    np.testing.assert_array_equal(np.concatenate([r["output"] for r in got]), x)


def test_pipeline_round_trips_with_input_copies(loop, session, streaming):
    x = np.arange(1001, dtype=np.int64)
    got = loop.run(_collect(session, "encoder_decoder_stream", {"input": x}, {"chunk_size": 100, "input_copies": 3}))
    assert len(got) == 11
    np.testing.assert_array_equal(np.concatenate([r["output"] for r in got]), x)


def test_error_mid_stream_is_explicit_after_the_responses_sent(loop, session, streaming):
    async def run():
        op = await session.operator("counter")
        got = []
        async with op.stream({"input": np.zeros(1)}, {"count": 10, "fail_after": 4}) as responses:
            with pytest.raises(InvalidRequestError, match="gave up after 4"):
                async for response in responses:
                    got.append(int(response["output"][0]))
        return got

    assert loop.run(run()) == [0, 1, 2, 3]


def test_triton_error_ends_the_stream_with_tritons_message(loop, session, streaming):
    with pytest.raises(TritonError, match="not a multiple of input_copies"):
        loop.run(_collect(session, "decoder_stream", {"input": np.arange(5, dtype=np.int64)}, {"input_copies": 2}))


def test_cancel_stops_the_python_producer(loop, session, streaming):
    async def run():
        before = sum(r["responses"] for r in await _replica_stats(session, "counter"))
        cancelled = sum(r["cancelled"] for r in await _replica_stats(session, "counter"))
        op = await session.operator("counter")
        async with op.stream({"input": np.zeros(1)}, {"count": 1000, "seconds": 0.01}) as responses:
            async for _ in responses:
                break  # leaving the block cancels it
        await asyncio.sleep(0.3)
        stats = await _replica_stats(session, "counter")
        return sum(r["responses"] for r in stats) - before, sum(r["cancelled"] for r in stats) - cancelled

    produced, cancelled = loop.run(run())
    assert cancelled == 1
    assert 1 <= produced < 5  # 1000 asked, at most a few beyond the first were made
    # and the operator serves the next request normally
    assert len(loop.run(_collect(session, "counter", {"input": np.zeros(1)}, {"count": 5}))) == 5


def test_cancel_stops_triton(loop, session, streaming, tmp_path):
    log = tmp_path / "sent.log"

    async def run():
        op = await session.operator("tally_stream")
        async with op.stream({"input": np.zeros(1, np.int64)}, {"count": 100, "seconds": 0.02,
                                                                "log": str(log)}) as responses:
            async for _ in responses:
                break
        for _ in range(100):  # the model notices at its next response
            if "cancelled" in log.read_text():
                break
            await asyncio.sleep(0.05)
        sent = log.read_text().split()
        await asyncio.sleep(0.3)
        return sent, log.read_text().split()

    sent, later = loop.run(run())
    assert sent[-1] == "cancelled" and later == sent  # Triton's model stopped, and sent nothing since
    assert 1 <= len(sent) - 1 < 10  # of 100
    got = loop.run(_collect(session, "decoder_stream", {"input": np.arange(30, dtype=np.int64)}, {"chunk_size": 10}))
    assert len(got) == 3


def test_slow_reader_bounds_what_the_producer_buffers(loop, session, streaming):
    import dask.config

    window = dask.config.get("tdask.request.stream-window")

    async def run():
        op = await session.operator("counter")
        before = sum(r["responses"] for r in await _replica_stats(session, "counter"))
        most = 0
        async with op.stream({"input": np.zeros(1)}, {"count": 1000}) as responses:
            n = 0
            async for _ in responses:
                n += 1
                if n % 100 == 0:
                    await asyncio.sleep(0.05)  # let the producer run ahead if it could
                    most = max(most, len(responses._opened.channel.items))
                    stats = await _replica_stats(session, "counter")
                    produced = sum(r["responses"] for r in stats) - before
                    most_ahead = produced - n
                    # the caller's window plus the worker's: nothing more was made ahead of the reader
                    assert most_ahead <= 2 * window, most_ahead
        return n, most

    n, most = loop.run(run())
    assert n == 1000
    assert most <= window


def test_slow_reader_bounds_what_the_worker_reads_from_triton(loop, session, streaming):
    import dask.config

    window = dask.config.get("tdask.request.stream-window")

    def most_buffered(dask_worker):
        return max([c.streams.most_buffered for c in dask_worker.extensions["tdask"].triton.clients()], default=0)

    async def run():
        op = await session.operator("decoder_stream")
        n = 0
        async with op.stream({"input": np.arange(1000, dtype=np.int64)}, {"chunk_size": 1}) as responses:
            async for _ in responses:
                n += 1
                if n % 100 == 0:
                    await asyncio.sleep(0.05)  # Triton sends on meanwhile: the worker reads no more than its window
        return n, max((await session.client.run(most_buffered)).values())

    n, most = loop.run(run())
    assert n == 1000
    assert 1 <= most <= window


def test_a_call_to_triton_carries_the_next_request_unless_its_request_was_cancelled(loop, session, streaming):
    def calls(dask_worker):
        clients = dask_worker.extensions["tdask"].triton.clients()
        return [sum(c.streams.calls_opened for c in clients), sum(c.streams.calls_cancelled for c in clients)]

    async def opened_and_cancelled():
        return [sum(column) for column in zip(*(await session.client.run(calls)).values(), strict=True)]

    async def run():
        x = np.arange(30, dtype=np.int64)
        await _collect(session, "decoder_stream", {"input": x}, {"chunk_size": 10})  # a call is open and idle
        opened, cancelled = await opened_and_cancelled()
        for _ in range(3):
            assert len(await _collect(session, "decoder_stream", {"input": x}, {"chunk_size": 10})) == 3
        opened_in_a_row = (await opened_and_cancelled())[0] - opened
        op = await session.operator("decoder_stream")
        async with op.stream({"input": np.arange(1000, dtype=np.int64)}, {"chunk_size": 1}) as responses:
            async for _ in responses:
                break  # cancelled: its call is cancelled with it, not kept for the next request
        for _ in range(100):
            if (await opened_and_cancelled())[1] > cancelled:
                break
            await asyncio.sleep(0.05)
        assert len(await _collect(session, "decoder_stream", {"input": x}, {"chunk_size": 10})) == 3
        return opened_in_a_row, (await opened_and_cancelled())[1] - cancelled

    opened_in_a_row, cancelled = loop.run(run())
    assert opened_in_a_row == 0
    assert cancelled == 1


# -- the front door ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def door(loop, session, streaming):
    from tdask.frontdoor import FrontDoor

    front = loop.run(FrontDoor(session, http_port=0, grpc_port=0).start())
    yield front
    loop.run(front.close())


def _grpc_stream(door, model, x, parameters, requests=1):
    """Stock ``tritonclient.grpc`` streaming (start_stream / async_stream_infer), Triton's empty final response
    asked for: every response of every request, by request id."""
    import queue

    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(door.grpc_address)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for i in range(requests):
            tensor = grpcclient.InferInput("input", list(x.shape), "INT64")
            tensor.set_data_from_numpy(x)
            client.async_stream_infer(model, [tensor], request_id=f"r{i}", parameters=parameters,
                                      enable_empty_final_response=True)
        by_id: dict[str, list] = {f"r{i}": [] for i in range(requests)}
        finished = 0
        while finished < requests:
            result, error = got.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if response.outputs:
                by_id[response.id].append(result.as_numpy("output"))
            finished += final
        return by_id
    finally:
        client.stop_stream()
        client.close()


def test_stock_grpc_streaming_through_the_front_door(door, streaming):
    x = np.arange(2500, dtype=np.int64)
    by_id = _grpc_stream(door, "encoder_decoder_stream", x, {"chunk_size": 1000}, requests=3)
    for chunks in by_id.values():
        assert [len(c) for c in chunks] == [1000, 1000, 500]
        np.testing.assert_array_equal(np.concatenate(chunks), x)
    (chunks,) = _grpc_stream(door, "decoder_stream", ~x, {"chunk_size": 2000}).values()
    np.testing.assert_array_equal(np.concatenate(chunks), x)


def test_stock_grpc_asyncio_streaming(loop, door, streaming):
    import tritonclient.grpc.aio as grpcaio

    async def run():
        client = grpcaio.InferenceServerClient(door.grpc_address)
        x = np.arange(30, dtype=np.int64)
        tensor = grpcaio.InferInput("input", [30], "INT64")
        tensor.set_data_from_numpy(x)

        async def requests():
            yield {"model_name": "encoder_decoder_stream", "inputs": [tensor], "parameters": {"chunk_size": 7}}

        try:
            return [r.as_numpy("output") async for r, e in client.stream_infer(requests()) if e is None], x
        finally:
            await client.close()

    chunks, x = loop.run(run())
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), x)


def test_server_sent_events_from_generate_stream(door, streaming):
    import json
    import subprocess

    x = list(range(25))
    url = f"{door.http_url}/v2/models/encoder_decoder_stream/generate_stream"
    body = json.dumps({"input": x, "parameters": {"chunk_size": 10}})
    out = subprocess.run(["curl", "-sN", "-X", "POST", url, "-d", body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    events = [json.loads(line[len("data: "):]) for line in out.splitlines() if line.startswith("data: ")]
    assert [len(e["output"]) for e in events] == [10, 10, 5]
    assert sum((e["output"] for e in events), []) == x
    # an error before any response is the protocol's error status
    bad = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                          f"{door.http_url}/v2/models/encoder_decoder_stream/generate_stream", "-d", "{not json"],
                         capture_output=True, text=True, timeout=60).stdout
    assert bad == "400"


def test_front_door_counts_streamed_responses(door, streaming):
    import urllib.request

    _grpc_stream(door, "counter", np.zeros(1, np.int64), {"count": 4})
    metrics = urllib.request.urlopen(f"{door.http_url}/metrics", timeout=10).read().decode()
    assert 'tdask_frontdoor_stream_responses_total{model="counter",protocol="grpc_stream"} 4.0' in metrics
    assert 'tdask_frontdoor_first_response_seconds_count{model="counter",protocol="grpc_stream"} 1.0' in metrics


def test_replicas_count_streamed_responses_and_time_to_first_response(loop, session, streaming):
    from tdask.observe.metrics import aggregate

    loop.run(_collect(session, "counter", {"input": np.zeros(1)}, {"count": 5}))
    snapshots = {r["replica"]: r for r in loop.run(_replica_stats(session, "counter"))}
    assert sum(s["first_response_histogram"]["count"] for s in snapshots.values()) >= 1
    (row,) = aggregate(snapshots)["operators"]
    assert row["responses"] >= 5 and row["first_p50_ms"] >= 0
