"""Hostile peers on a worker's request-stream socket: random bytes, huge and "negative" lengths, truncated frames,
many silent connections, a peer that stops reading. The worker goes on serving, and its memory, its reserved bytes,
its shared memory and its file descriptors come back to where they were once the peers have left."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import dask.config
import numpy as np
import psutil
import pytest
from conftest import SUPPORT

from benchmarks.chaos import cut_off, sent
from tdask.compat import TimeoutErrors

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SETTINGS = {
    "tdask.transfer.connect-timeout": "2s",  # a peer that opens no stream is dropped after this
    "tdask.transfer.stall-timeout": "1s",  # a message that stops coming ends its stream after this
    "tdask.transfer.max-message-bytes": 64 << 20,
    "tdask.transfer.max-unread-messages": 200,
    "tdask.transfer.shared-memory-frames-idle-bytes": 0,  # no region is kept for reuse: /dev/shm back to baseline
}


def _worker_state(dask_worker) -> dict:
    from tdask.comm import tcp
    from tdask.shm.regions import frame_pool

    proc = psutil.Process()
    return {"pid": os.getpid(), "rss": proc.memory_info().rss, "fds": proc.num_fds(),
            "receiving": tcp.receiving(dask_worker.loop.asyncio_loop), "leased": frame_pool().leased_bytes}


def _shm_bytes() -> int:
    return sum(entry.stat().st_size for entry in os.scandir("/dev/shm") if entry.name.startswith("tdask_"))


def test_hostile_peers_leave_the_worker_serving_with_its_resources_back_at_baseline(loop):
    from distributed import Client, LocalCluster
    from distributed.comm import connect

    import tdask
    from tdask import Deployment, OperatorConfig
    from tdask.comm import protocol
    from tdask.comm.stream import open_stream
    from tdask.comm.tcp import U64
    from tdask.registry import token_key

    async def scenario() -> dict:
        with dask.config.set(SETTINGS):
            async with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, asynchronous=True,
                                    dashboard_address=":0", host="127.0.0.1") as cluster, \
                    Client(cluster, asynchronous=True) as client:
                async with Deployment(client, [OperatorConfig("echo", "sample_operators:Echo", repository=SUPPORT)]), \
                        await tdask.connect(client) as session:
                    echo = await session.operator("echo")
                    x = np.arange(100_000, dtype=np.int64)
                    assert np.array_equal((await echo.infer({"input": x}))["output"], x)  # the socket is open now
                    (worker,) = (await client.scheduler.identity(n_workers=-1))["workers"]
                    port = (await client.rpc(worker).tdask_stream_socket())["port"]
                    token = await client.get_metadata(token_key(worker))
                    before = (await client.run(_worker_state))[worker]
                    shm_before = _shm_bytes()
                    out = {"before": before, "closed": {}}

                    async def peer() -> socket.socket:
                        sock = socket.socket()
                        sock.setblocking(False)
                        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
                        return sock

                    async def opened(with_token: bool):
                        """A peer that opens a stream (Dask's handshake, the handler, a hello) and hands back its
                        socket to misbehave on; the worker's hello as it answered."""
                        comm = await connect(f"tdask://127.0.0.1:{port}", timeout=5)
                        await comm.write({"op": protocol.STREAM_HANDLER, "reply": False})
                        if with_token:
                            await open_stream(comm, 5, token)
                            return comm, None
                        await comm.write(protocol.hello(b"", token="not the token"))
                        return comm, await comm.read()

                    # 1. random bytes in place of Dask's handshake
                    rng = np.random.default_rng(5)
                    for _ in range(5):
                        sock = await peer()
                        whole = await sent(sock, rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
                        out["closed"].setdefault("random bytes", []).append(not whole or await cut_off(sock, 10))
                        sock.close()
                    # 2. without the token: refused, told why, never told the worker's host
                    comm, answer = await opened(with_token=False)
                    out["refused"] = answer
                    comm.abort()
                    # 3. a member of the cluster gone rogue: lengths no message may have
                    for name, words in [("16 GiB frame", [1, 16 << 30]), ("negative length", [1, 2**64 - 1]),
                                        ("2^40 frames", [1 << 40]), ("65 MiB over the limit", [2, 1 << 20, 64 << 20])]:
                        comm, _ = await opened(with_token=True)
                        sock = comm.socket.dup()
                        whole = await sent(sock, struct.pack(f"<{len(words)}Q", *words))
                        await asyncio.sleep(0.2)
                        out.setdefault("reserved for a rogue length", {})[name] = \
                            (await client.run(_worker_state))[worker]["receiving"]
                        comm.abort()
                        out["closed"][name] = not whole or await cut_off(sock, 10)
                        sock.close()
                    # 4. a frame within the limit, announced and then not sent: cut after the stall timeout
                    comm, _ = await opened(with_token=True)
                    raw = comm.socket.dup()
                    assert await sent(raw, U64.pack(1) + U64.pack(32 << 20) + bytes(8 << 20))
                    await asyncio.sleep(0.3)
                    out["receiving while stalled"] = (await client.run(_worker_state))[worker]["receiving"]
                    out["closed"]["truncated frame"] = await cut_off(raw, 10)
                    raw.close()
                    comm.abort()
                    # 5. many connections that say nothing: dropped after the connect timeout
                    silent = [await peer() for _ in range(200)]
                    out["fds with 200 silent peers"] = (await client.run(_worker_state))[worker]["fds"]
                    out["closed"]["silent"] = all(await asyncio.gather(*(cut_off(s, 15) for s in silent)))
                    for s in silent:
                        s.close()
                    # 6. a peer that sends requests and reads no answer: cut once 200 answers wait for it
                    comm, _ = await opened(with_token=True)
                    comm.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    replica = next(iter((await session.operators())["echo"].values()))["replicas"][0]["replica"]
                    request = np.arange(7000, dtype=np.int64)  # 56 KB: inline in the message, answered inline
                    n_sent, cut = 0, False
                    try:
                        for i in range(5000):
                            await asyncio.wait_for(comm.write({"op": protocol.INFER, "id": i, "replica": replica,
                                                               "request_id": f"r{i}", "inputs": {"input": request},
                                                               "parameters": {}, "keep": False,
                                                               "output_device": None}), 10)
                            n_sent += 1
                    except (OSError, *TimeoutErrors):
                        cut = True
                    if not cut:  # it took all 5000: does it end the stream once its answers pile up?
                        sock = comm.socket.dup()
                        cut = await cut_off(sock, 30)
                        sock.close()
                    comm.abort()
                    out["closed"]["not reading"] = cut
                    out["not reading sent"] = n_sent
                    # the worker serves on, and what the peers took is back
                    await asyncio.sleep(1)
                    assert np.array_equal((await echo.infer({"input": x}))["output"], x)
                    for _ in range(50):
                        out["after"] = (await client.run(_worker_state))[worker]
                        if out["after"]["fds"] <= before["fds"] + 5 and out["after"]["leased"] == 0:
                            break
                        await asyncio.sleep(0.2)
                    out["shm"] = (shm_before, _shm_bytes())
                    return out

    out = loop.run(scenario(), timeout=400)
    before, after = out["before"], out["after"]
    assert all(out["closed"]["random bytes"]), out["closed"]
    for attack in ("16 GiB frame", "negative length", "2^40 frames", "65 MiB over the limit", "truncated frame",
                   "silent", "not reading"):
        assert out["closed"][attack] is True, (attack, out["closed"])
    assert set(out["reserved for a rogue length"].values()) == {0}, out["reserved for a rogue length"]
    assert out["refused"]["op"] == "hello" and "token" in out["refused"]["error"] and not out["refused"]["host"]
    assert out["receiving while stalled"] == 32 << 20  # reserved for the frame while it was still to come
    assert out["fds with 200 silent peers"] >= before["fds"] + 150  # the test did hold them open
    assert after["receiving"] == 0 and after["leased"] == 0, after
    assert after["fds"] <= before["fds"] + 5, (before, after)
    assert after["rss"] < before["rss"] + (64 << 20), (before, after)  # no announced length was ever allocated
    assert out["shm"][1] <= out["shm"][0], out["shm"]
