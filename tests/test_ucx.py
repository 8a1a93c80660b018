"""The hello-world flow over Dask's UCX comms (distributed-ucxx), on CPU with UCX_TLS=tcp,sm,self."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, python_env
from test_cli import Proc, alive, check_client_output, run_client

pytest.importorskip("distributed_ucxx")
pytestmark = [pytest.mark.timeout(900), pytest.mark.ucx, pytest.mark.slow]

UCX_ENV = {"UCX_TLS": "tcp,sm,self", "UCX_WARN_UNUSED_ENV_VARS": "n"}
BAD = re.compile(r"Segmentation fault|segfault|Unable to contact Actor|Fatal Python error|core dumped")

WHICH_COMM = r"""
import asyncio, sys, numpy as np, tdask

async def main():
    async with await tdask.connect(sys.argv[1]) as session:
        op = await session.operator("encoder_decoder")
        out = await op.infer({"input": np.arange(10)})
        assert np.array_equal(out["output"], np.arange(10))
        for address, stream in session.pool.streams.items():
            print("comm", address, type(stream.comm).__module__, type(stream.comm).__name__)

asyncio.run(main())
"""


def test_hello_world_over_ucx_with_a_thousand_concurrent_requests(tmp_path):
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"), **UCX_ENV)
    deploy = Proc([sys.executable, "-m", "deploy", "--protocol", "ucx", "--scheduler-port", "0",
                   "--dashboard-address", ":0", "--encoders", "1", "8", "1", "CPU", "--decoders", "1", "8", "1", "CPU",
                   "--encoder-decoders", "1", "16", "--log-dir", str(tmp_path / "logs")], tmp_path / "deploy.log", env)
    try:
        deploy.wait_for("press Ctrl-C to Exit", timeout=240)
        address = re.search(r"scheduler (ucx://\S+),", deploy.text()).group(1)
        check_client_output(run_client(env, "--scheduler-address", address, "--requests-per-client", "10"), 10)
        # the connection in use is a UCX comm
        which = subprocess.run([sys.executable, "-c", WHICH_COMM, address], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=120)
        assert which.returncode == 0, which.stderr[-3000:]
        comms = [line.split() for line in which.stdout.splitlines() if line.startswith("comm ")]
        assert comms and all(c[1].startswith("ucx://") and "ucx" in c[2].lower() for c in comms), which.stdout
        # 1,000 requests in flight at once: all answered and correct (plain actors fail so over UCX)
        result = run_client(env, "--scheduler-address", address, "--clients", "2", "--requests-per-client", "500",
                            "--input-size-mean", "100", timeout=600)
        check_client_output(result, 1000)
        assert not BAD.search(result.stdout + result.stderr)
        children = deploy.descendants()
        deploy.p.send_signal(signal.SIGTERM)
        assert deploy.p.wait(180) == 0, deploy.text()[-3000:]
        assert alive(children) == []
        logs = deploy.text() + "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
        assert not BAD.search(logs), BAD.search(logs).group(0)
    finally:
        deploy.stop()


def test_dask_scheduler_and_workers_over_ucx_with_deploy_and_client(tmp_path):
    import os

    from test_cli import free_port

    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"), **UCX_ENV)
    port = free_port()
    address = f"ucx://127.0.0.1:{port}"
    dask_bin = os.path.join(os.path.dirname(sys.executable), "dask")
    scheduler = Proc([dask_bin, "scheduler", "--protocol", "ucx", "--host", "127.0.0.1", "--port", str(port),
                      "--dashboard-address", ":0"], tmp_path / "scheduler.log", env)
    workers = []
    try:
        scheduler.wait_for("Scheduler at:", timeout=120)
        for i in range(3):
            workers.append(Proc([dask_bin, "worker", address, "--nthreads", "1", "--name", f"w{i}",
                                 "--host", "127.0.0.1"], tmp_path / f"worker{i}.log", env))
        for w in workers:
            w.wait_for("Starting established connection", timeout=120)
        deploy = Proc([sys.executable, "-m", "deploy", "--scheduler-address", address], tmp_path / "deploy.log", env)
        try:
            deploy.wait_for("press Ctrl-C to Exit", timeout=240)
            assert all(w.startswith("ucx://") for w in re.findall(r"on worker (\S+):", deploy.text()))
            check_client_output(run_client(env, "--scheduler-address", address, "--requests-per-client", "10",
                                           "--output-device", "cpu"), 10)
            deploy.p.send_signal(signal.SIGTERM)
            assert deploy.p.wait(120) == 0, deploy.text()[-3000:]
        finally:
            deploy.stop()
    finally:
        for w in workers:
            w.p.send_signal(signal.SIGTERM)
        codes = []
        for w in workers:
            try:
                codes.append(w.p.wait(60))
            finally:
                w.stop()
        scheduler.p.send_signal(signal.SIGTERM)
        codes.append(scheduler.p.wait(60))
        scheduler.stop()
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert not BAD.search(logs), BAD.search(logs).group(0)
    assert codes == [0, 0, 0, 0], f"worker and scheduler exit codes: {codes}"
