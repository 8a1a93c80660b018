"""The front door against Triton called directly, both with the stock ``tritonclient`` (asyncio), same run:

* ``direct_grpc`` / ``direct_http``: the client calls Triton's encoder, then its decoder (with the returned
  ``input_copies``), on the direct Triton server of :mod:`benchmarks.pipeline`;
* ``frontdoor_grpc`` / ``frontdoor_http``: the same client calls ``encoder_decoder`` once through a front door
  (``tdask-frontdoor``, a process of its own as users run it) of the hello-world deployment;
* ``workerdoor_grpc`` / ``workerdoor_http``: the same, through the front door inside the first worker
  (``tdask-frontdoor --on-workers``), which saves the hop from a front door process to the worker.

Cells are interleaved (direct, front door, repeated ``--rounds`` times) and each row records the share of the
machine's cores busy while it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from benchmarks.common import CpuBusy, Measurement, StockClient, print_table, ratio, run_load

# (elements, concurrency, protocols): the cells; 8 MB over gRPC only
CELLS = [(1000, 1, ("grpc", "http")), (1000, 16, ("grpc", "http")), (1_000_000, 1, ("grpc",)),
         (1_000_000, 4, ("grpc",))]
SMOKE_CELLS = [(1000, 1, ("grpc", "http")), (100_000, 1, ("grpc",))]


@contextlib.asynccontextmanager
async def front_door_process(scheduler_address: str) -> AsyncIterator[tuple[str, str]]:
    """``tdask-frontdoor`` on free ports for the deployment at ``scheduler_address``: (HTTP URL, gRPC address)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tdask.cli.frontdoor", "--scheduler-address", scheduler_address, "--http-port", "0",
        "--grpc-port", "0", "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    drain = None
    try:
        seen = ""
        while "press Ctrl-C" not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                raise RuntimeError(f"tdask-frontdoor exited before it served:\n{seen}")
            seen += line.decode()
        http = re.search(r"KServe v2 HTTP: (\S+)", seen).group(1)
        grpc = re.search(r"KServe v2 gRPC: (\S+)", seen).group(1)
        drain = asyncio.ensure_future(proc.stdout.read())  # its later output never blocks it
        yield http, grpc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()


@contextlib.asynccontextmanager
async def worker_front_door(client: Any) -> AsyncIterator[dict[str, str]]:
    """Front doors placed in the workers (:class:`~tdask.frontdoor.workers.WorkerFrontDoors`): the first worker's
    addresses ("http", "grpc")."""
    from tdask.frontdoor import WorkerFrontDoors

    await client.register_plugin(WorkerFrontDoors())
    try:
        doors = await client.run(WorkerFrontDoors.addresses)
        yield doors[min(doors)]
    finally:
        await client.unregister_worker_plugin(WorkerFrontDoors.name)


SIDES = ("direct", "frontdoor", "workerdoor")


async def measure_frontdoor(args: argparse.Namespace, direct_server: Any, client: Any) -> list[dict[str, Any]]:
    """Each cell: direct, a front door process and a worker's front door, interleaved, per protocol."""
    cells = SMOKE_CELLS if args.smoke else CELLS
    rows = []
    async with (front_door_process(client.scheduler.address) as (http_url, grpc_address),
                worker_front_door(client) as in_worker):
        clients = {
            ("grpc", "direct"): StockClient("grpc", direct_server.grpc_url),
            ("grpc", "frontdoor"): StockClient("grpc", grpc_address),
            ("http", "direct"): StockClient("http", direct_server.http_url),
            ("http", "frontdoor"): StockClient("http", http_url),
            ("grpc", "workerdoor"): StockClient("grpc", in_worker["grpc"]),
            ("http", "workerdoor"): StockClient("http", in_worker["http"]),
        }
        calls = {key: (c.direct if key[1] == "direct" else c.pipeline) for key, c in clients.items()}
        try:
            for size, conc, protocols in cells:
                x = np.arange(size, dtype=np.int64)
                for protocol in protocols:
                    systems = {f"{side}_{protocol}": calls[(protocol, side)] for side in SIDES}
                    for call in systems.values():  # warm-up: connections, first-call costs
                        await run_load(call, x, conc, requests=2 * conc)
                    ms = {s: Measurement(s) for s in systems}
                    cpu = {s: CpuBusy() for s in systems}
                    for _ in range(args.rounds):
                        for system, call in systems.items():
                            cpu[system].start()
                            ms[system].add(*await run_load(call, x, conc, duration=args.duration))
                            cpu[system].stop()
                    summary = {s: {**m.summary(), "cpu_busy": cpu[s].fraction} for s, m in ms.items()}
                    d = summary[f"direct_{protocol}"]
                    for side in SIDES[1:]:
                        f = summary[f"{side}_{protocol}"]
                        f["throughput_ratio"] = ratio(f["throughput"], d["throughput"])
                        f["p50_overhead_ms"] = (round(f["p50_ms"] - d["p50_ms"], 3)
                                                if f["p50_ms"] is not None and d["p50_ms"] is not None else None)
                    rows.append({"size": size, "concurrency": conc, "protocol": protocol, "systems": summary})
                    print(f"front door size {size} concurrency {conc} {protocol}: " + ", ".join(
                        f"{s} {v['throughput']}/s p50 {v['p50_ms']} ms errors {v['errors']}"
                        for s, v in summary.items()), flush=True)
        finally:
            for c in clients.values():
                await c.close()
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    table = []
    for row in rows:
        for system, s in row["systems"].items():
            table.append({"size": row["size"], "conc": row["concurrency"], "system": system, **s})
    return print_table(table, [
        ("size", "elements"), ("conc", "concurrency"), ("system", "system"), ("throughput", "req/s"),
        ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("throughput_ratio", "thr / direct"),
        ("p50_overhead_ms", "p50 - direct ms"), ("cpu_busy", "CPU busy"), ("errors", "errors")],
        "Front door: stock tritonclient through tdask's front door (encoder_decoder; frontdoor: a process of its own, "
        "workerdoor: inside the worker) vs the same client calling Triton directly (encoder, then decoder)")
