"""The hello-world pipeline on a real cluster with real Triton servers, and proof of the real path."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from conftest import settled_count

from tdask import (
    Deployment,
    InvalidRequestError,
    OperatorConfig,
    OperatorNotFoundError,
    PlacementError,
    TensorRef,
    TritonError,
)

pytestmark = pytest.mark.timeout(600)


def triton_successes(hello_world, operator: str) -> int:
    """Successful inferences of ``operator`` summed over the Triton servers of its replicas."""
    total = 0
    seen = set()
    for info in hello_world.replicas:
        if info["name"] != operator or info["triton_grpc"] in seen:
            continue
        seen.add(info["triton_grpc"])
        c = grpcclient.InferenceServerClient(info["triton_grpc"])
        stats = c.get_inference_statistics(operator, as_json=True)
        c.close()
        for model in stats.get("model_stats", []):
            total += int(model["inference_stats"]["success"].get("count", 0))
    return total


def infer(loop, session, operator, inputs, parameters=None, **kw):
    async def go():
        op = await session.operator(operator)
        return await op.infer(inputs, parameters, **kw)

    return loop.run(go())


def test_pipeline_returns_each_input_and_triton_counted_exactly_n(loop, session, hello_world):
    before = {op: triton_successes(hello_world, op) for op in ("encoder", "decoder")}
    rng = np.random.default_rng(1)
    inputs = [rng.integers(-(2**40), 2**40, size=n, dtype=np.int64) for n in (1000, 0, 1, 17, 1000, 5, 999, 3, 2, 64)]

    async def go():
        op = await session.operator("encoder_decoder")
        return await asyncio.gather(*(op.infer({"input": x}) for x in inputs))

    results = loop.run(go())
    for x, r in zip(inputs, results, strict=True):
        assert r["output"].dtype == np.int64
        assert np.array_equal(r["output"], x)
    after = {op: settled_count(lambda op=op: triton_successes(hello_world, op), before[op] + len(inputs))
             for op in ("encoder", "decoder")}
    assert after["encoder"] - before["encoder"] == len(inputs)
    assert after["decoder"] - before["decoder"] == len(inputs)


def test_triton_servers_are_processes_tdask_started_for_their_workers(loop, client, hello_world):
    worker_pids = loop.run(lambda: client.run(os.getpid))
    for info in hello_world.replicas:
        if info["name"] not in ("encoder", "decoder"):
            continue
        server = psutil.Process(info["triton_pid"])
        assert server.name() == "tritonserver"
        assert server.ppid() == worker_pids[info["worker"]], "Triton must be a child of the replica's worker"


@pytest.mark.parametrize("copies", [1, 2, 3])
def test_encoder_raw_output_is_repeated_then_inverted(loop, session, hello_world, copies):
    x = np.array([0, 1, 2, 3, 4], dtype=np.int64)
    enc = infer(loop, session, "encoder", {"input": x}, {"input_copies": copies})
    assert np.array_equal(enc["output"], ~np.repeat(x, copies))
    assert enc["input_copies"].tolist() == [copies]
    dec = infer(loop, session, "decoder", {"input": enc["output"]}, {"input_copies": copies})
    assert np.array_equal(dec["output"], x)
    # the whole pipeline round-trips for every input_copies
    out = infer(loop, session, "encoder_decoder", {"input": x}, {"input_copies": copies})
    assert np.array_equal(out["output"], x)


def test_per_request_delay_is_applied(loop, session, hello_world):
    x = np.arange(20, dtype=np.int64)
    start = time.perf_counter()
    out = infer(loop, session, "encoder", {"input": x}, {"delay": 0.01})
    elapsed = time.perf_counter() - start
    assert np.array_equal(out["output"], ~x)
    assert elapsed >= 0.2  # 20 elements x 10 ms: a lower bound set by the model's sleep


class FrameCounter:
    """Counts every byte this process receives over Dask's TCP comms and tdask's socket request streams
    (hooks both frame decoders)."""

    def __init__(self, monkeypatch):
        import distributed.comm.tcp as tcp

        import tdask.comm.tcp as socket_comm

        self.total = 0
        original_tcp, original_socket = tcp.from_frames, socket_comm.loads

        def count(frames):
            self.total += sum(memoryview(f).nbytes for f in frames)
            return frames

        async def counting_tcp(frames, *args, **kwargs):
            return await original_tcp(count(frames), *args, **kwargs)

        monkeypatch.setattr(tcp, "from_frames", counting_tcp)
        monkeypatch.setattr(socket_comm, "loads", lambda frames, *a, **kw: original_socket(count(frames), *a, **kw))


def test_a_future_passed_to_the_next_operator_moves_worker_to_worker(loop, session, hello_world, monkeypatch):
    counter = FrameCounter(monkeypatch)
    read_bytes = lambda: counter.total  # noqa: E731
    x = np.arange(1_000_000, dtype=np.int64)  # 8 MB

    async def chain():
        enc, dec = await session.operator("encoder"), await session.operator("decoder")
        f1 = enc.infer({"input": x}, {"input_copies": 2}, keep=True)
        f2 = dec.infer({"input": f1.output("output")}, {"input_copies": 2}, keep=True)
        return await f1, await f2

    start = read_bytes()
    r1, r2 = loop.run(chain())
    received = read_bytes() - start
    assert isinstance(r1["output"], TensorRef) and r1["output"].nbytes == 16_000_000
    assert isinstance(r2["output"], TensorRef)
    assert received < 1_000_000, f"the caller read {received} bytes: tensors went through it"
    start = read_bytes()
    out = loop.run(r2.fetch("output"))
    assert read_bytes() - start >= 8_000_000  # the measurement does see tensors that do come here (a fetch)
    assert np.array_equal(out, x)
    start = read_bytes()
    answered = infer(loop, session, "decoder", {"input": ~x}, {"input_copies": 1})  # and answers on the stream
    assert read_bytes() - start >= 8_000_000
    assert np.array_equal(answered["output"], x)


def _inputs_in_place(dask_worker) -> int:
    return sum(server["shm"].get("inputs_in_place", 0) for server in dask_worker.extensions["tdask"].stats()["triton"])


def test_a_kept_tensor_fetched_by_another_worker_is_its_models_input_in_place(loop, client, session, hello_world):
    """Worker to worker without an extra copy: the decoder's worker receives the encoder's kept 16 MB output
    straight into a shared-memory region of its Triton server, which reads it there."""
    decoder_worker = next(i["worker"] for i in hello_world.replicas if i["name"] == "decoder")
    x = np.arange(1_000_000, dtype=np.int64)

    async def in_place() -> int:
        return (await client.run(_inputs_in_place, workers=[decoder_worker]))[decoder_worker]

    async def scenario():
        enc, dec = await session.operator("encoder"), await session.operator("decoder")
        for _ in range(10):  # the encoder replica on another worker than the decoder's
            kept = await enc.infer({"input": x}, {"input_copies": 2}, keep=True)
            if kept.worker != decoder_worker:
                break
        before = await in_place()
        decoded = await dec.infer({"input": kept["output"]}, {"input_copies": 2})
        return kept.worker, decoded["output"], await in_place() - before

    encoder_worker, out, received_in_place = loop.run(scenario())
    assert encoder_worker != decoder_worker
    np.testing.assert_array_equal(out, x)
    assert received_in_place == 1


def test_two_replicas_of_an_operator_both_receive_work(loop, session, hello_world):
    encoders = {i["replica"]: i for i in hello_world.replicas if i["name"] == "encoder"}
    assert len(encoders) == 2 and len({i["worker"] for i in encoders.values()}) == 2

    async def go():
        op = await session.operator("encoder")
        return await asyncio.gather(*(op.infer({"input": np.arange(10)}) for _ in range(20)))

    answered_by = {r.replica for r in loop.run(go())}
    assert answered_by == set(encoders)


def test_wrong_dtype_is_tritons_clear_error_and_service_goes_on(loop, session, hello_world):
    with pytest.raises(TritonError, match="INT64"):
        infer(loop, session, "encoder", {"input": np.arange(5, dtype=np.float32)})
    with pytest.raises(TritonError, match="INT64"):
        infer(loop, session, "encoder_decoder", {"input": np.arange(5, dtype=np.float32)})
    assert np.array_equal(infer(loop, session, "encoder_decoder", {"input": np.arange(5)})["output"], np.arange(5))


def test_missing_input_is_a_clear_error(loop, session, hello_world):
    with pytest.raises(TritonError, match="input"):
        infer(loop, session, "encoder", {})
    with pytest.raises(InvalidRequestError, match="missing input tensor 'input'"):
        infer(loop, session, "encoder_decoder", {"wrong_name": np.arange(3)})
    assert np.array_equal(infer(loop, session, "encoder_decoder", {"input": np.arange(3)})["output"], np.arange(3))


def test_non_tensor_inputs_and_bad_parameters_are_rejected(loop, session, hello_world):
    with pytest.raises(InvalidRequestError, match="must be an array"):
        infer(loop, session, "encoder", {"input": "not a tensor"})
    with pytest.raises(InvalidRequestError, match="parameter 'input_copies' must be"):
        infer(loop, session, "encoder", {"input": np.arange(3)}, {"input_copies": [1, 2]})
    with pytest.raises(TritonError, match="input_copies"):
        infer(loop, session, "encoder", {"input": np.arange(3)}, {"input_copies": "abc"})


def test_unknown_operator_and_version_are_clear_errors(loop, session, hello_world):
    with pytest.raises(OperatorNotFoundError, match="no operator named 'nope'.*encoder"):
        loop.run(session.operator("nope"))
    with pytest.raises(OperatorNotFoundError, match="has no version 7"):
        loop.run(session.operator("encoder", 7))


def test_unknown_resource_fails_at_once_and_service_goes_on(loop, client, session, hello_world):
    deployment = Deployment(client, [OperatorConfig("other", "sample_operators:Echo",
                                                    repository=str(__import__("conftest").SUPPORT),
                                                    resources={"TPU": 1})])
    start = time.perf_counter()
    with pytest.raises(PlacementError, match="TPU"):
        loop.run(deployment.start(), timeout=60)
    assert time.perf_counter() - start < 30  # an error, not a wait in no-worker
    assert np.array_equal(infer(loop, session, "encoder_decoder", {"input": np.arange(4)})["output"], np.arange(4))


def test_gpu_operator_without_a_gpu_worker_is_a_clear_error(loop, client, hello_world):
    from conftest import MODELS

    deployment = Deployment(client, [OperatorConfig("encoder_gpu", repository=MODELS, device="GPU")])
    with pytest.raises(PlacementError, match="GPU"):
        loop.run(deployment.start(), timeout=60)


def test_a_reference_whose_data_does_not_match_its_declared_shape_is_rejected(loop, session, hello_world):
    async def go():
        enc = await session.operator("encoder")
        kept = await enc.infer({"input": np.arange(100_000)}, keep=True)
        ref = kept["output"]
        lying = TensorRef(ref.worker, ref.key, (5,), ref.dtype, 40)
        missing = TensorRef(ref.worker, "no-such-key", ref.shape, ref.dtype, ref.nbytes)
        dec = await session.operator("decoder")
        errors = []
        for bad in (lying, missing):
            try:
                await dec.infer({"input": bad})
            except InvalidRequestError as e:
                errors.append(str(e))
        ok = await dec.infer({"input": ref})
        return errors, ok

    errors, ok = loop.run(go())
    assert len(errors) == 2
    assert "declares shape (5,)" in errors[0] and "no longer held" in errors[1]
    assert np.array_equal(ok["output"], np.arange(100_000))


def test_output_device_cpu_gives_numpy_and_gpu_is_refused_without_cupy(loop, session, hello_world):
    out = infer(loop, session, "encoder_decoder", {"input": np.arange(4)}, output_device="cpu")
    assert isinstance(out["output"], np.ndarray) and np.array_equal(out["output"], np.arange(4))
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidRequestError, match="without CuPy"):
            infer(loop, session, "encoder", {"input": np.arange(4)}, output_device="gpu")


def test_a_future_runs_whether_or_not_it_is_awaited_and_keeps_its_outcome(loop, session, hello_world):
    """A request runs whether or not anyone awaits its future, and the future can be awaited again (same result,
    same error) and by two tasks; a cancelled one says so."""

    async def run() -> None:
        op = await session.operator("encoder_decoder")
        x = np.arange(50, dtype=np.int64)

        awaited = op.infer({"input": x})
        first = await awaited
        assert np.array_equal(first["output"], x) and awaited.done()
        assert await awaited is first

        unawaited = op.infer({"input": x + 1})
        for _ in range(600):  # nobody awaits it: it must still go out and be answered
            if unawaited.done():
                break
            await asyncio.sleep(0.05)
        assert unawaited.done(), "a future nobody awaited was never answered"
        assert np.array_equal((await unawaited)["output"], x + 1)

        shared = op.infer({"input": x + 2})

        async def other_awaiter():
            return await shared

        other = asyncio.ensure_future(other_awaiter())  # starts after this task awaits it below
        mine = await shared
        assert await other is mine and np.array_equal(mine["output"], x + 2)

        failing = op.infer({"input": x.astype(np.float32)})
        for _ in range(2):
            with pytest.raises(TritonError):
                await failing

        cancelled = op.infer({"input": x})
        assert cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert cancelled.done()

    loop.run(run())
