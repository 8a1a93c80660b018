"""Shared fixtures: one event loop thread, one real cluster and one hello-world deployment per session.

Starting worker processes and Triton servers costs seconds on 2 cores, so integration
tests share them; tests that need their own processes (CLIs, signals) start them.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "support"
OPERATORS = ROOT / "operators"
MODELS = OPERATORS / "triton_core_models"
sys.path.insert(0, str(SUPPORT))


class LoopThread:
    """An asyncio loop in a thread, so sync tests can share async Dask objects."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any] | Callable[[], Awaitable[Any]], timeout: float = 180) -> Any:
        """Run a coroutine, or a callable returning an awaitable, on the loop thread.

        Dask objects made with ``asynchronous=True`` only return awaitables when called
        on their own loop, hence the callable form (``loop.run(lambda: cluster.close())``).
        """
        if callable(coro):
            fn = coro

            async def call() -> Any:
                return await fn()

            coro = call()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def triton_processes() -> set[int]:
    """tritonserver processes and their Python backend stubs."""
    pids = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])[:300]
            if "tritonserver" in cmdline or "triton_python_backend_stub" in cmdline or p.info["name"] in (
                    "tritonserver", "triton_python_b"):
                if p.status() != psutil.STATUS_ZOMBIE:
                    pids.add(p.pid)
        except psutil.Error:
            pass
    return pids


def settled_count(read: Callable[[], int], expected: int, timeout: float = 5) -> int:
    """``read()`` once it reached ``expected`` (or after ``timeout``): Triton counts a request when it releases
    it, which may come just after the response. The caller asserts the exact number."""
    deadline = time.monotonic() + timeout
    while (count := read()) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


async def triton_successes(infos: list[dict], operator: str) -> int:
    """Successful inferences of ``operator`` in its (one) Triton server, from Triton's own statistics."""
    import tritonclient.grpc.aio as grpcclient

    (url,) = {i["triton_grpc"] for i in infos if i["name"] == operator}
    c = grpcclient.InferenceServerClient(url)
    try:
        stats = await c.get_inference_statistics(operator, as_json=True)
    finally:
        await c.close()
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats.get("model_stats", []))


def _commands(pids: set[int]) -> list[list[str]]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid).cmdline()[:2])
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every tritonserver, Python stub and worker the tests started is gone at the end of the session."""
    before = triton_processes()
    me = psutil.Process()
    yield
    end = time.time() + 30

    def ours() -> set[int]:
        # started during the session and either below this process or orphaned (parent gone);
        # other programs' servers on a shared machine are not ours to judge
        mine = {c.pid for c in me.children(recursive=True)}
        out = set()
        for pid in triton_processes() - before:
            try:
                if pid in mine or psutil.Process(pid).ppid() == 1:
                    out.add(pid)
            except psutil.Error:
                pass
        return out

    while time.time() < end and ours():
        time.sleep(0.5)
    left = ours()
    children = [c for c in me.children(recursive=True) if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(c.cmdline())]
    assert not left, f"Triton processes left behind: {_commands(left)}"
    assert not children, f"child processes left behind: {[c.cmdline()[:3] for c in children]}"


@pytest.fixture(scope="session")
def cluster(loop: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import dask.config

    from tdask.deploy.cluster import start_embedded_cluster

    log_dir = tmp_path_factory.mktemp("logs")
    dask.config.set({"tdask.log-dir": str(log_dir)})
    cluster = loop.run(start_embedded_cluster(n_workers=3, scheduler_port=0, dashboard_address=":0"))
    cluster.log_dir = log_dir
    yield cluster
    loop.run(lambda: cluster.close())


@pytest.fixture(scope="session")
def client(loop: LoopThread, cluster: Any) -> Iterator[Any]:
    from distributed import Client

    async def make() -> Client:
        return await Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True)

    c = loop.run(make())
    yield c
    loop.run(lambda: c.close())


def hello_world_configs(encoder_replicas: int = 2) -> list:
    from tdask import OperatorConfig

    return [
        OperatorConfig("encoder", "TritonCoreOperator", repository=MODELS, replicas=encoder_replicas, max_inflight=4),
        OperatorConfig("decoder", "TritonCoreOperator", repository=MODELS, max_inflight=4),
        OperatorConfig("encoder_decoder", "encoder_decoder:EncoderDecoder", repository=OPERATORS, max_inflight=8),
    ]


@pytest.fixture(scope="session")
def hello_world(loop: LoopThread, client: Any) -> Iterator[Any]:
    """encoder (2 replicas), decoder and encoder_decoder deployed on the shared cluster."""
    from tdask import Deployment

    deployment = Deployment(client, hello_world_configs())
    loop.run(deployment.start(), timeout=300)
    yield deployment
    loop.run(deployment.stop(), timeout=120)


@pytest.fixture(scope="session")
def session(loop: LoopThread, client: Any, hello_world: Any) -> Iterator[Any]:
    import tdask

    s = loop.run(tdask.connect(client))
    yield s
    loop.run(s.close())


def python_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: this venv's bin first on PATH (its dask and tdask commands)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    # deploy's front door on free ports: tests run beside each other's deploys (and a user's)
    env.setdefault("DASK_TDASK__FRONTDOOR__HTTP_PORT", "0")
    env.setdefault("DASK_TDASK__FRONTDOOR__GRPC_PORT", "0")
    env.update(extra)
    return env
