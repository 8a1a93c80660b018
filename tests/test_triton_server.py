"""Integration tests against a real tritonserver started by :class:`tdask.triton.server.TritonServer`.

One server per module (startup and model loads cost seconds on 2 cores); each test runs its
coroutine on one module-scoped event loop, because the server's process and gRPC channels
belong to the loop that created them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from conftest import settled_count

from tdask.errors import InvalidRequestError, TritonError, TritonServerError
from tdask.triton import environment
from tdask.triton.client import TritonModelClient
from tdask.triton.model_config import merge_model_config, read_model_config
from tdask.triton.server import TritonServer, success_count

pytestmark = pytest.mark.timeout(300)

REPOSITORY = Path(__file__).resolve().parents[1] / "operators" / "triton_core_models"


class Env:
    """The module's loop, server and client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = TritonServer(REPOSITORY, environ={"TDASK_TEST_ENVIRON": "given"})
        self.client = TritonModelClient("", "")  # replaced once the server runs

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def infer(self, model: str, data: np.ndarray, **kwargs: Any) -> dict[str, np.ndarray]:
        return self.run(self.client.infer(model, {"input": data}, **kwargs))


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    e = Env()
    try:
        e.run(e.server.start())
        e.client = TritonModelClient(e.server.grpc_url, e.server.http_url)
        for name in ("encoder", "decoder"):
            config = merge_model_config(
                read_model_config(REPOSITORY, name),
                name=name,
                instance_count=2,
                parameters={"input_copies": 2},
            )
            e.run(e.server.load_model(name, config))
        yield e
    finally:
        e.run(e.client.close())
        e.run(e.server.stop())
        e.loop.close()


def test_server_is_a_child_process_we_started(env: Env) -> None:
    assert env.server.is_alive()
    process = psutil.Process(env.server.pid)
    assert process.ppid() == os.getpid()
    assert "tritonserver" in process.name()
    assert env.server.grpc_url.startswith("127.0.0.1:")
    assert env.server.metrics_url.endswith("/metrics")


def test_the_server_and_its_stubs_run_with_the_environment_given(env: Env) -> None:
    server = psutil.Process(env.server.pid)
    stubs = [p for p in server.children(recursive=True) if "triton_python_backend_stub" in p.name()]
    assert len(stubs) >= 4  # two instances each of encoder and decoder
    assert "TDASK_TEST_ENVIRON" not in os.environ
    assert {p.environ().get("TDASK_TEST_ENVIRON") for p in [server, *stubs]} == {"given"}


def test_models_loaded_with_merged_config(env: Env) -> None:
    for name in ("encoder", "decoder"):
        config = env.run(env.server.model_config(name))
        assert config["name"] == name
        assert config["backend"] == "python"
        assert config["instance_group"][0]["count"] == 2
        assert config["instance_group"][0]["kind"] == "KIND_CPU"
        assert config["parameters"]["input_copies"] == {"string_value": "2"}
        assert config["input"][0]["data_type"] == "TYPE_INT64"  # from auto_complete_config


def test_config_parameter_is_the_default(env: Env) -> None:
    result = env.infer("encoder", np.array([0, 1, 2], dtype=np.int64))
    np.testing.assert_array_equal(result["output"], ~np.array([0, 0, 1, 1, 2, 2]))
    np.testing.assert_array_equal(result["input_copies"], [2])


@pytest.mark.parametrize("copies", [1, 2, 3])
def test_encoder_raw_output_repeats_then_inverts(env: Env, copies: int) -> None:
    x = np.array([0, 1, 2, 3, 4], dtype=np.int64)
    result = env.infer("encoder", x, parameters={"input_copies": copies})
    expected = ~np.repeat(x, copies)
    np.testing.assert_array_equal(result["output"], expected)
    assert result["output"].dtype == np.int64
    np.testing.assert_array_equal(result["input_copies"], [copies])
    assert result["input_copies"].dtype == np.int64


@pytest.mark.parametrize("copies", [1, 2, 3])
@pytest.mark.parametrize("size", [0, 1, 1000])
def test_decoder_inverts_encoder(env: Env, copies: int, size: int) -> None:
    x = np.random.default_rng(size).integers(-(2**40), 2**40, size, dtype=np.int64)
    encoded = env.infer("encoder", x, parameters={"input_copies": str(copies)})
    assert encoded["output"].shape == (size * copies,)
    decoded = env.infer("decoder", encoded["output"], parameters={"input_copies": copies})
    assert decoded["output"].shape == (size,)
    np.testing.assert_array_equal(decoded["output"], x)


def test_per_request_delay_is_per_element(env: Env) -> None:
    x = np.arange(10, dtype=np.int64)
    start = time.monotonic()
    env.infer("encoder", x, parameters={"delay": 0.01})
    assert time.monotonic() - start >= 0.1


def test_wrong_dtype_keeps_tritons_message(env: Env) -> None:
    with pytest.raises(TritonError, match="INT64") as info:
        env.infer("encoder", np.arange(3, dtype=np.float32))
    assert "FP32" in str(info.value)
    assert str(info.value).startswith("encoder: ")


def test_missing_input_is_a_clear_error(env: Env) -> None:
    with pytest.raises(TritonError, match="input"):
        env.run(env.client.infer("encoder", {}))


def test_unsupported_numpy_dtype_is_an_invalid_request(env: Env) -> None:
    with pytest.raises(InvalidRequestError, match="complex"):
        env.infer("encoder", np.zeros(3, dtype=np.complex64))


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"input_copies": "abc"}, "parameter 'input_copies' must be a positive integer, got 'abc'"),
        ({"input_copies": 0}, "parameter 'input_copies' must be a positive integer, got 0"),
        ({"delay": "soon"}, "parameter 'delay' must be a non-negative number"),
        ({"delay": -1}, "parameter 'delay' must be a non-negative number"),
    ],
)
def test_bad_parameter_is_a_clear_error(env: Env, parameters: dict, message: str) -> None:
    with pytest.raises(TritonError) as info:
        env.infer("encoder", np.arange(3, dtype=np.int64), parameters=parameters)
    assert message in str(info.value)


def test_decoder_rejects_length_not_a_multiple(env: Env) -> None:
    with pytest.raises(TritonError, match="not a multiple of input_copies=2"):
        env.infer("decoder", np.arange(5, dtype=np.int64))


def test_one_bad_request_does_not_fail_the_others(env: Env) -> None:
    x = np.arange(4, dtype=np.int64)

    async def many() -> list[Any]:
        calls = [
            env.client.infer("encoder", {"input": x}, parameters={"input_copies": c})
            for c in (1, "bad", 3, 2, "bad")
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = env.run(many())
    assert [isinstance(r, TritonError) for r in results] == [False, True, False, False, True]
    np.testing.assert_array_equal(results[2]["output"], ~np.repeat(x, 3))


def test_concurrent_requests_sharing_an_id_get_their_own_answers(env: Env) -> None:
    """40 requests at once with one caller id each get their own answer, and every connection they
    used is idle and open afterwards, ready for reuse."""
    async def many() -> list[Any]:
        calls = [
            env.client.infer("encoder", {"input": np.arange(n, dtype=np.int64)},
                             parameters={"input_copies": 1 + n % 3}, request_id="same-id")
            for n in range(1, 41)
        ]
        return await asyncio.gather(*calls)

    for n, result in enumerate(env.run(many()), start=1):
        np.testing.assert_array_equal(result["output"], ~np.repeat(np.arange(n, dtype=np.int64), 1 + n % 3))
    http = env.client.stats()["http"]
    assert 0 < http["open"] == http["idle"] <= 40  # kept and reused, none left closed among the idle ones


def stand_in_server(root: Path, script: str) -> Path:
    """A ``bin/tritonserver`` shell script beside the real backends, where TritonServer looks for them."""
    real_root = environment.ensure().server_root
    for part in ("backends", "python_backend_stubs"):
        (root / part).symlink_to(real_root / part)
    (root / "bin").mkdir()
    fake = root / "bin" / "tritonserver"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    return fake


def _leased(client: TritonModelClient) -> int:
    return client.stats()["leased_regions"]


def _in_region(client: TritonModelClient, array: np.ndarray) -> bool:
    """Whether ``array`` views one of the client's leased shared-memory regions (not a copy)."""
    return client.pool is not None and client.pool.find(array) is not None


async def _load_encoder(server: TritonServer, instances: int, **parameters: Any) -> None:
    await server.load_model("encoder", merge_model_config(read_model_config(REPOSITORY, "encoder"), name="encoder",
                                                          instance_count=instances, parameters=parameters or None))


def test_large_outputs_are_region_views_passed_on_in_place(env: Env) -> None:
    """8 MB through shared memory: the encoder's output is a view of its region (no copy), the decoder
    reads it where it lies, and the region goes back to the pool once no array views it."""
    x = np.random.default_rng(7).integers(-(2**40), 2**40, 1_000_000, dtype=np.int64)
    # the first large call of a model with given parameters learns how much larger than its input the output is
    env.infer("decoder", env.infer("encoder", x)["output"], parameters={"input_copies": 2})
    before = success_count(env.run(env.server.model_statistics("decoder")))
    shm_calls, in_place = env.client.shm_calls, env.client.shm_inputs_in_place
    encoded = env.infer("encoder", x)
    regions = {region.name: region for region in env.client.pool.regions()}
    assert _in_region(env.client, encoded["output"])
    np.testing.assert_array_equal(encoded["output"], ~np.repeat(x, 2))
    decoded = env.infer("decoder", encoded["output"], parameters={"input_copies": 2})
    np.testing.assert_array_equal(decoded["output"], x)
    assert env.client.shm_calls - shm_calls == 2
    assert env.client.shm_inputs_in_place - in_place == 1  # the decoder's input was not copied
    assert successes_counted(env, "decoder", before + 1) - before == 1
    assert _leased(env.client) == 2  # one region per call, held by the arrays that view it
    del encoded
    assert _leased(env.client) == 1
    view = decoded["output"][::2]
    del decoded
    assert _leased(env.client) == 1  # a view of an output keeps its region too
    np.testing.assert_array_equal(view, x[::2])
    del view
    assert _leased(env.client) == 0
    again = env.infer("encoder", x)["output"]  # pooled regions are reused, not created again
    assert {r.name for r in env.client.pool.regions()} <= set(regions)
    del again


def test_a_tensor_received_into_a_landing_region_is_a_models_input_in_place(env: Env) -> None:
    """A worker receives a caller's large frame into ``landing`` (a leased region of its server): the
    model reads it there (not copied into another region), and the region is back once nothing views it."""
    x = np.random.default_rng(8).integers(-(2**40), 2**40, 1_000_000, dtype=np.int64)
    assert env.run(env.client.landing(1000)) is None  # below the shared-memory threshold: a buffer of its own

    async def receive() -> np.ndarray:
        room = await env.client.landing(x.nbytes)
        room[:] = x.view(np.uint8)  # what the request stream's recv_into does
        return np.ndarray(x.shape, x.dtype, buffer=room)  # what Dask's deserializer makes of the frame

    received = env.run(receive())
    assert _in_region(env.client, received)
    shm_calls, in_place = env.client.shm_calls, env.client.shm_inputs_in_place
    out = env.infer("encoder", received)
    np.testing.assert_array_equal(out["output"], ~np.repeat(x, 2))
    assert env.client.shm_calls - shm_calls == 1
    assert env.client.shm_inputs_in_place - in_place == 1
    leased = _leased(env.client)
    del received
    assert _leased(env.client) == leased - 1
    del out


def test_a_tensor_another_process_lent_is_read_where_it_lies_and_its_region_dropped_once_gone(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large tensor mapped from another process's region (what a worker makes of a lent frame) is the
    model's input there: the server registers that region and reads it in place, not from a copy in its own
    regions. The loan is returned once nothing views the tensor; a tensor written to after it was mapped is
    copied (the region no longer holds what it shows); the registration goes once the region's owner
    removed the region."""
    import uuid

    import dask.config

    from tdask.shm.mappings import mappings
    from tdask.shm.names import REGION_PREFIX
    from tdask.shm.regions import Region

    monkeypatch.setitem(dask.config.config["tdask"]["transfer"], "sweep-interval", "200ms")
    lender = Region(f"{REGION_PREFIX}{os.getpid()}_lender{uuid.uuid4().hex[:8]}", 16 << 20)
    x = np.random.default_rng(9).integers(-(2**40), 2**40, 1_000_000, dtype=np.int64)
    offset = 3 * 4096 + 64  # where the lender put it: not at a page's start
    lender.view(np.int64, [x.size], offset)[:] = x
    returned: list[int] = []

    def mapped() -> np.ndarray:
        view = mappings.borrow(lender.name, offset, x.nbytes, lambda: returned.append(1))
        return np.ndarray(x.shape, x.dtype, buffer=view)

    def registered() -> set[str]:
        status = env.run(env.client.client.get_system_shared_memory_status(as_json=True))
        return set(status.get("regions", {}))

    try:
        lent = mapped()
        from_peers, in_place = env.client.shm_inputs_from_peers, env.client.shm_inputs_in_place
        out = env.infer("encoder", lent)
        np.testing.assert_array_equal(out["output"], ~np.repeat(x, 2))
        assert env.client.shm_inputs_from_peers - from_peers == 1
        assert env.client.shm_inputs_in_place - in_place == 1
        assert f"peer_{lender.name}" in registered()
        del lent
        assert returned == [1]

        written = mapped()
        written[0] = 12345  # this process's own page now: the lender's region does not hold it
        out2 = env.infer("encoder", written)
        assert out2["output"][0] == out2["output"][1] == ~12345
        np.testing.assert_array_equal(out2["output"][2:], ~np.repeat(x[1:], 2))
        assert env.client.shm_inputs_from_peers - from_peers == 1  # copied, not read from the lender
        del written, out, out2
    finally:
        lender.destroy()  # the owner removes its region: the server's registration of it goes too
    for _ in range(100):
        if f"peer_{lender.name}" not in registered():
            break
        env.run(asyncio.sleep(0.1))
    assert f"peer_{lender.name}" not in registered()
    assert env.client.stats()["peer_regions"] == []


def test_a_full_dev_shm_is_a_clear_error_not_a_crashed_worker(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs allocates a region's pages when they are first written: a region created on a full /dev/shm
    would kill the process with SIGBUS at the copy. A region that does not fit is refused instead."""
    import shutil
    import types

    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1 << 20))
    x = np.ones(6_000_000, dtype=np.int64)  # 48 MB: no pooled region of its size class yet
    with pytest.raises(TritonError, match=r"/dev/shm has 1048576 bytes free.*shared-memory-threshold to 0"):
        env.infer("encoder", x)
    monkeypatch.undo()
    np.testing.assert_array_equal(env.infer("encoder", x[:1000])["output"], ~np.repeat(x[:1000], 2))


def test_outputs_outlive_their_client() -> None:
    """Closing a client (its server restarted or stopped) must not unmap memory an output still views."""
    async def scenario() -> tuple[np.ndarray, set[str]]:
        server = TritonServer(REPOSITORY)
        await server.start()
        try:
            await _load_encoder(server, 1)
            client = TritonModelClient(server.grpc_url, server.http_url)
            out = (await client.infer("encoder", {"input": np.arange(100_000, dtype=np.int64)}))["output"]
            names = {region.name for region in client.pool.regions()}
            await client.close()
            return out, names
        finally:
            await server.stop()

    out, names = asyncio.run(scenario())
    np.testing.assert_array_equal(out, ~np.arange(100_000, dtype=np.int64))  # still mapped, still right
    assert not names & set(os.listdir("/dev/shm"))  # already unlinked: nothing is left behind
    del out


def successes_counted(env: Env, model: str, expected: int) -> int:
    return settled_count(lambda: success_count(env.run(env.server.model_statistics(model))), expected)


def test_statistics_rise_by_exactly_the_requests_sent(env: Env) -> None:
    before = success_count(env.run(env.server.model_statistics("encoder")))
    for _ in range(7):
        env.infer("encoder", np.arange(3, dtype=np.int64))
    assert successes_counted(env, "encoder", before + 7) - before == 7


@pytest.mark.slow
def test_spawns_survive_busy_grpc_threads(env: Env, tmp_path: Path) -> None:
    """A worker restarts Triton while its gRPC threads are busy: the spawn must not run Python
    between fork and exec (a ``preexec_fn`` crashed ~1 child in 4 here with SIGSEGV). 60 spawns of a
    stand-in binary that exits 3 at once, under load: every one must exit 3, none crash."""
    fake = stand_in_server(tmp_path, "exit 3")

    async def scenario() -> tuple[list[str], int]:
        stop = asyncio.Event()

        async def busy() -> int:  # 8 requests at a time on a gRPC stream: gRPC's threads at work
            import tritonclient.grpc.aio as grpcclient

            tensor = grpcclient.InferInput("input", [10], "INT64")
            tensor.set_data_from_numpy(np.arange(10, dtype=np.int64))
            queue: asyncio.Queue = asyncio.Queue()
            for _ in range(8):
                queue.put_nowait({"model_name": "encoder", "inputs": [tensor]})

            async def requests() -> Any:
                while (request := await queue.get()) is not None:
                    yield request

            n = 0
            async for _result, error in env.client.client.stream_infer(requests()):
                assert error is None, error
                n += 1
                queue.put_nowait(None if stop.is_set() else {"model_name": "encoder", "inputs": [tensor]})
                if stop.is_set():
                    break
            return n

        load = asyncio.ensure_future(busy())
        exits = []
        try:
            for _ in range(60):
                try:
                    await TritonServer(REPOSITORY, server_path=str(fake)).start()
                except TritonServerError as e:
                    exits.append(str(e).split(";")[0])
        finally:
            stop.set()
        return exits, await load

    exits, calls = env.run(scenario())
    assert calls > 0
    assert exits == ["tritonserver exited with code 3 during startup"] * 60


def test_load_failure_raises_with_tritons_message(env: Env) -> None:
    with pytest.raises(TritonServerError, match="no_such_model"):
        env.run(env.server.load_model("no_such_model"))


def test_stop_leaves_no_tritonserver(env: Env) -> None:
    """Runs last in this module: stops the shared server."""
    pid = env.server.pid
    assert pid is not None
    env.run(env.client.close())
    env.run(env.server.stop())
    env.run(env.server.stop())  # idempotent
    assert not env.server.is_alive()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # only this process's direct children: other tests' workers may run their own servers
    children = [p for p in psutil.Process().children(recursive=False)
                if "tritonserver" in p.name() and p.status() != psutil.STATUS_ZOMBIE]
    assert children == []


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TritonServerError, match="not found"):
        TritonServer(REPOSITORY, server_path=str(tmp_path / "tritonserver"))


def test_startup_failure_reports_the_log(tmp_path: Path) -> None:
    fake = stand_in_server(tmp_path, "echo 'boom: cannot start' >&2\nexit 3")
    server = TritonServer(REPOSITORY, server_path=str(fake))
    with pytest.raises(TritonServerError) as info:
        asyncio.run(server.start())
    message = str(info.value)
    assert "exited with code 3" in message
    assert "boom: cannot start" in message
    assert not server.is_alive()


def test_server_dies_with_its_sigkilled_parent(tmp_path: Path) -> None:
    """The PR_SET_PDEATHSIG orphan guard: a SIGKILLed owner takes its tritonserver along."""
    script = (
        "import asyncio, sys\n"
        "from tdask.triton.server import TritonServer\n"
        "async def main():\n"
        f"    server = TritonServer({str(REPOSITORY)!r})\n"
        "    await server.start()\n"
        "    print(server.pid, flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(tmp_path),  # the killed owner cannot remove its backend directory
    }
    owner = psutil.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        line = owner.stdout.readline()
        assert line.strip().isdigit(), line
        pid = int(line)
        assert psutil.Process(pid).ppid() == owner.pid
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            pytest.fail("tritonserver outlived its SIGKILLed owner")
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.stdout.close()


def test_killed_server_fails_requests_in_flight_explicitly() -> None:
    """In-flight requests get an explicit error when the server dies, not a hang, and a later request
    opens a new connection (which fails just as explicitly while no server is there)."""

    async def scenario() -> tuple[list[Any], Any, float]:
        server = TritonServer(REPOSITORY)
        await server.start()
        client = TritonModelClient(server.grpc_url, server.http_url)
        try:
            await _load_encoder(server, 2)
            x = np.arange(20, dtype=np.int64)
            await client.infer("encoder", {"input": x})  # a connection is open
            slow = [asyncio.ensure_future(client.infer("encoder", {"input": x}, parameters={"delay": 0.1}))
                    for _ in range(4)]
            await asyncio.sleep(0.5)
            started = time.monotonic()
            psutil.Process(server.pid).kill()
            results = await asyncio.wait_for(asyncio.gather(*slow, return_exceptions=True), 30)
            elapsed = time.monotonic() - started
            # Until every thread of the killed server has exited, its listening socket may still accept a connect
            # that is then reset (the leader shows as a zombie before that). "No server there" starts once reaped.
            await asyncio.wait_for(server.wait(), 30)
            try:
                later = await asyncio.wait_for(client.infer("encoder", {"input": x}), 30)
            except Exception as e:  # noqa: BLE001 - the assertion below names what was expected
                later = e
            return results, later, elapsed
        finally:
            await client.close()
            await server.stop()

    results, later, elapsed = asyncio.run(scenario())
    assert all(isinstance(r, TritonError) for r in results), results
    assert all("connection to Triton ended" in str(r) and "may or may not have run" in str(r) for r in results), \
        results
    assert elapsed < 20
    assert isinstance(later, TritonError) and "cannot connect to Triton" in str(later), later


@pytest.mark.slow
def test_a_large_output_of_unknown_size_never_makes_a_model_run_twice_unasked() -> None:
    """Triton finds that an output does not fit its shared-memory region only after the model ran. The first
    call with given parameters gets its outputs in the message; a region that proves too small (the model's
    config changed on the live server) fails a non-idempotent call explicitly, and reruns an idempotent one."""
    x = np.arange(100_000, dtype=np.int64)  # 800 KB: above the shared-memory threshold

    def executions(stats: dict) -> int:
        return sum(int(m.get("execution_count", 0) or 0) for m in stats.get("model_stats", []))

    async def scenario() -> list[tuple[str, int]]:
        server = TritonServer(REPOSITORY)
        await server.start()
        client = None
        try:
            await _load_encoder(server, 1, input_copies=2)
            client = TritonModelClient(server.grpc_url, server.http_url)
            seen = []

            async def call(copies: int, **kwargs: Any) -> None:
                before = executions(await server.model_statistics("encoder"))
                try:
                    out = (await client.infer("encoder", {"input": x}, **kwargs))["output"]
                    np.testing.assert_array_equal(out, ~np.repeat(x, copies))
                    outcome = "in region" if _in_region(client, out) else "in message"
                    del out
                except TritonError as e:
                    assert "not run again because its operator is not idempotent" in str(e), e
                    outcome = "error"
                seen.append((outcome, await executions_since(before)))

            async def executions_since(before: int) -> int:
                # Triton counts an execution when it releases the request, which may come just after the
                # response: wait for the first, then a moment more so that a second one would be seen too
                for _ in range(100):
                    if executions(await server.model_statistics("encoder")) > before:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                return executions(await server.model_statistics("encoder")) - before

            await call(2)  # a new output size: in the message
            await call(2)  # now known: in a region
            await _load_encoder(server, 1, input_copies=4)  # the output grows past the region sized for it
            await call(4)
            await call(4)  # the next request gets a larger region
            await _load_encoder(server, 1, input_copies=64)
            await call(64, idempotent=True)
            return seen
        finally:
            if client is not None:
                await client.close()
            await server.stop()

    assert asyncio.run(scenario()) == [("in message", 1), ("in region", 1), ("error", 1), ("in region", 1),
                                       ("in message", 2)]


def _dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_shared_memory_regions_of_a_dead_process_are_removed() -> None:
    """The stubs' /dev/shm regions carry their server's prefix. Stopping a server removes any it left, and
    starting one removes those of servers and tensor pools whose owning process died (a SIGKILLed worker)
    but keeps live ones."""
    shm = Path("/dev/shm")
    dead_pid = _dead_pid()
    orphan = shm / f"tdask_triton_{dead_pid}_0_stale"
    alive = shm / f"tdask_triton_{os.getpid()}_0_in_use"
    orphan_pool = shm / f"tdask_pool_{dead_pid}_0_1"  # a dead worker's tensor region
    alive_pool = shm / f"tdask_pool_{os.getpid()}_0_1"
    for path in (orphan, alive, orphan_pool, alive_pool):
        path.write_bytes(b"x")

    async def scenario() -> tuple[list[str], bool, bool]:
        server = TritonServer(REPOSITORY)
        try:
            await server.start()
            assert not orphan_pool.exists() and alive_pool.exists()
            await _load_encoder(server, 1)
            own = sorted(p.name for p in shm.glob(f"{server.shm_prefix}*"))
            left = shm / f"{server.shm_prefix}left_behind"
            left.write_bytes(b"x")
        finally:
            await server.stop()
        return own, orphan.exists(), left.exists()

    try:
        own, orphan_left, own_left = asyncio.run(scenario())
        assert own, "the stubs' regions do not carry the server's prefix"
        assert not orphan_left and alive.exists() and not own_left
    finally:
        for path in (orphan, alive, orphan_pool, alive_pool):
            path.unlink(missing_ok=True)


def _stubs_of(server_pid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if len(argv) > 5 and argv[0].endswith("triton_python_backend_stub") and argv[5] == str(server_pid):
            out.append(proc)
    return out


def test_stubs_of_a_killed_server_go_when_it_is_stopped() -> None:
    """A SIGKILLed server cannot stop its Python stubs, and one busy or stuck then may wait for it forever
    (they ignore SIGTERM). Stopping the dead server (the watchdog does, before starting a new one) kills
    what is left of its process group. The stubs are frozen here so that none can notice and exit itself."""

    async def scenario() -> tuple[int, int]:
        server = TritonServer(REPOSITORY)
        await server.start()
        try:
            await _load_encoder(server, 2)
            stubs = _stubs_of(server.pid)
            for stub in stubs:
                stub.suspend()
            psutil.Process(server.pid).kill()
            await server.wait()
            await asyncio.sleep(0.5)
            frozen = sum(stub.is_running() for stub in stubs)
        finally:
            await server.stop()
        gone, alive = psutil.wait_procs(stubs, timeout=10)
        for stub in alive:
            stub.kill()
        return frozen, len(alive)

    frozen, left = asyncio.run(scenario())
    assert frozen == 2  # the server's death alone did not end them
    assert left == 0


@pytest.mark.slow
def test_a_server_with_many_instances_is_given_time_to_stop_gracefully() -> None:
    """Triton finalizes a model's Python instances one by one (~1.2 s each here), so ten take longer than the
    base 10 s: the stop waits for them (every model's ``finalize`` runs) instead of SIGKILLing the server."""

    async def scenario() -> int | None:
        server = TritonServer(REPOSITORY)
        await server.start()
        try:
            await _load_encoder(server, 10)
        finally:
            await server.stop()
        return server.returncode

    assert asyncio.run(scenario()) == 0  # exited by itself, not -9


def test_temporary_directories_of_gone_owners_are_swept_others_never(tmp_path: Path, monkeypatch) -> None:
    """A SIGKILLed worker leaves its server's directory (backend copy, log); the next replica or Triton start
    removes the directories whose owner pid is dead, never one whose owner lives or whose name has no owner."""
    from tdask.triton.server import sweep_orphans

    gone_pid = _dead_pid()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    orphan = tmp_path / f"tdask-triton-{gone_pid}-abc"
    alive = tmp_path / f"tdask-triton-{os.getpid()}-def"
    unnamed = tmp_path / "tdask-triton-ghi"  # no owner in the name (made before owners were named)
    for path in (orphan, alive, unnamed):
        (path / "backends").mkdir(parents=True)
    sweep_orphans()
    assert not orphan.exists() and alive.is_dir() and unnamed.is_dir()


def test_orphaned_stubs_of_tdask_servers_are_swept_others_never(tmp_path: Path) -> None:
    """A server killed with its SIGKILLed worker leaves stubs that no tdask code sees die; the next Triton
    start on the host kills those of tdask's servers that are gone, and nothing else. Stand-ins with a
    stub's argv (argv[2]: the stub's shared-memory region, argv[5]: its server's pid)."""
    from tdask.triton.server import sweep_orphans

    gone_pid = _dead_pid()
    stub = str(tmp_path / "triton_python_backend_stub")

    def stand_in(region: str, server_pid: int) -> subprocess.Popen:
        code = f"{region}=0;import time;time.sleep(60)"  # argv: stub, -c, code (= region...), x, x, pid
        return subprocess.Popen(["bash", "-c", f'exec -a {stub} "$0" -c "$1" x x {server_pid}', sys.executable, code])

    orphan = stand_in("tdask_triton_1_a", gone_pid)
    served = stand_in("tdask_triton_2_b", os.getpid())  # its server is alive
    foreign = stand_in("other_prefix_c", gone_pid)  # not a tdask server's stub
    procs = [orphan, served, foreign]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(_stubs_of(gone_pid)) + len(_stubs_of(os.getpid())) < 3:
            time.sleep(0.05)
        sweep_orphans()
        orphan.wait(timeout=10)
        time.sleep(0.3)
        assert orphan.returncode == -9
        assert served.poll() is None and foreign.poll() is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
