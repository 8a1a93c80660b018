"""The streaming hello world through the command lines: ``python -m deploy --streaming`` and ``python -m
tdask.client --stream`` over dask, gRPC and HTTP; and a worker killed mid-stream ends the stream with an explicit
error after the responses already sent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import numpy as np
import pytest
from conftest import python_env
from test_cli import Proc, alive, run_client

from tdask import ReplicaUnavailableError

PY = sys.executable
pytestmark = pytest.mark.slow


def test_deploy_streaming_then_client_stream_over_every_protocol_then_a_worker_killed_mid_stream(tmp_path):
    address_file = tmp_path / "addr.json"
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(address_file))
    deploy = Proc([PY, "-m", "deploy", "--streaming", "--scheduler-port", "0", "--dashboard-address", ":0",
                   "--http-port", "0", "--grpc-port", "0"], tmp_path / "deploy.log", env)
    try:
        deploy.wait_for("press Ctrl-C to Exit")
        out = deploy.text()
        for name in ("encoder", "decoder", "encoder_decoder", "decoder_stream", "encoder_decoder_stream"):
            assert f"Started {name} replica" in out
        for protocol in ("dask", "grpc", "http"):
            result = run_client(env, "--stream", "--operator", "encoder_decoder_stream", "--protocol", protocol,
                                "--requests-per-client", "6", "--input-size-mean", "2500", "--parameter",
                                "chunk_size=1000")
            assert result.returncode == 0, result.stdout + result.stderr
            assert "Requests: 6 Errors: 0" in result.stdout, result.stdout
            assert "Responses per request: 3.00 First response p50:" in result.stdout, result.stdout
            assert result.stdout.strip().splitlines()[-1] == "Clients Stopped Exit Code 0"
        scheduler = json.loads(address_file.read_text())["scheduler_address"]
        got, error = asyncio.run(_killed_mid_stream(scheduler))
        assert len(got) >= 2 and got == list(range(len(got)))  # what was sent before, in order, once each
        assert isinstance(error, ReplicaUnavailableError) and f"broke after {len(got)} responses" in str(error)
        children = deploy.descendants()
        deploy.p.send_signal(signal.SIGTERM)
        assert deploy.p.wait(120) == 0, deploy.text()[-3000:]
        time.sleep(1)
        assert alive(children) == [], f"left behind: {[p.cmdline()[:3] for p in alive(children)]}"
    finally:
        deploy.stop()


async def _killed_mid_stream(scheduler: str) -> tuple[list[int], BaseException | None]:
    """Stream 200 chunks of 10 (20 ms each) from decoder_stream; SIGKILL its worker after the second."""
    import tdask

    async with await tdask.connect(scheduler) as session:
        op = await session.operator("decoder_stream")
        x = ~np.arange(2000, dtype=np.int64)
        got: list[int] = []
        async with op.stream({"input": x}, {"chunk_size": 10, "delay": 0.002}) as responses:
            try:
                async for response in responses:
                    got.append(int(response["output"][0]) // 10)
                    if len(got) == 2:
                        pids = await session.client.run(os.getpid, workers=[response.worker])
                        os.kill(pids[response.worker], signal.SIGKILL)
            except ReplicaUnavailableError as e:
                return got, e
        return got, None
