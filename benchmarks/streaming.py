"""``python -m benchmarks.streaming``: a streamed request through tdask against Triton's own gRPC streaming of the
same decoupled model, same server, same run.

Each request asks ``decoder_stream`` for ``--responses`` responses of ``--chunk`` int64 each (its input is
``responses * chunk`` elements). ``direct``: stock ``tritonclient.grpc`` streaming (``start_stream`` /
``async_stream_infer``, the form of Triton's own examples), called straight at the Triton server tdask started
for the replica. ``tdask``: ``RemoteOperator.stream`` from this process, through the replica's worker. Rounds are
interleaved, each side going first in every other round; the ratios are of the medians over rounds. Requests run
one at a time (a stream's time to first response and its response rate are what a reader waits for).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CpuBusy, environment, print_table, write_json
from benchmarks.pipeline import embedded_client

RESULTS = Path(__file__).parent / "results" / "streaming.json"


def direct_stream(url: str, x: np.ndarray, chunk: int, requests: int) -> list[tuple[float, float, int]]:
    """(time to first response, whole request, responses) per request, stock tritonclient.grpc streaming."""
    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((result, error, time.perf_counter())))
    rows = []
    try:
        for i in range(requests):
            tensor = grpcclient.InferInput("input", list(x.shape), "INT64")
            tensor.set_data_from_numpy(x)
            start = time.perf_counter()
            client.async_stream_infer("decoder_stream", [tensor], request_id=str(i),
                                      parameters={"chunk_size": chunk}, enable_empty_final_response=True)
            first, n, total = None, 0, 0
            while True:
                result, error, at = got.get(timeout=60)
                if error is not None:
                    raise RuntimeError(error)
                response = result.get_response()
                if response.outputs:
                    out = result.as_numpy("output")
                    total += out.size
                    n += 1
                    if first is None:
                        first = at - start
                if response.parameters["triton_final_response"].bool_param:
                    break
            assert total == x.size, (total, x.size)
            rows.append((first, time.perf_counter() - start, n))
    finally:
        client.stop_stream()
        client.close()
    return rows


async def tdask_stream(op: Any, x: np.ndarray, chunk: int, requests: int) -> list[tuple[float, float, int]]:
    rows = []
    for _ in range(requests):
        start = time.perf_counter()
        first, n, total = None, 0, 0
        async with op.stream({"input": x}, {"chunk_size": chunk}) as responses:
            async for response in responses:
                total += response["output"].size
                n += 1
                if first is None:
                    first = time.perf_counter() - start
        assert total == x.size, (total, x.size)
        rows.append((first, time.perf_counter() - start, n))
    return rows


def summarize(rounds: list[list[tuple[float, float, int]]], busy: CpuBusy) -> dict[str, Any]:
    per_round = [{"first_ms": statistics.median(r[0] for r in rows) * 1e3,
                  "responses_per_s": sum(r[2] for r in rows) / sum(r[1] for r in rows)} for rows in rounds]
    return {"first_response_p50_ms": round(statistics.median(r["first_ms"] for r in per_round), 3),
            "responses_per_s": round(statistics.median(r["responses_per_s"] for r in per_round), 1),
            "rounds": per_round, "cpu_busy": busy.fraction}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import tdask
    from tdask import Deployment, OperatorConfig
    from tdask.cli.deploy import hello_world_repository

    models = hello_world_repository() / "triton_core_models"
    x = ~np.arange(args.responses * args.chunk, dtype=np.int64)
    configs = [OperatorConfig("decoder_stream", "TritonCoreOperator", repository=models, max_inflight=4)]
    async with embedded_client(1) as client:
        deployment = Deployment(client, configs)
        await deployment.start()
        try:
            async with await tdask.connect(client) as session:
                return await measure(args, client, await session.operator("decoder_stream"), x)
        finally:
            await deployment.stop()


async def measure(args: argparse.Namespace, client: Any, op: Any, x: np.ndarray) -> dict[str, Any]:
    infos = await client.run(lambda dask_worker: [r.info() for r in dask_worker.extensions["tdask"].replicas.values()])
    (url,) = {i["triton_grpc"] for per_worker in infos.values() for i in per_worker}
    await asyncio.to_thread(direct_stream, url, x, args.chunk, 3)  # warm-up
    await tdask_stream(op, x, args.chunk, 3)
    rounds: dict[str, list] = {"direct": [], "tdask": []}
    busy = {"direct": CpuBusy(), "tdask": CpuBusy()}
    order = [("direct", "tdask") if i % 2 == 0 else ("tdask", "direct") for i in range(args.rounds)]
    for sides in order:  # neither side always goes first
        for side in sides:
            busy[side].start()
            if side == "direct":
                rounds[side].append(await asyncio.to_thread(direct_stream, url, x, args.chunk, args.requests))
            else:
                rounds[side].append(await tdask_stream(op, x, args.chunk, args.requests))
            busy[side].stop()
    result = {side: summarize(rounds[side], busy[side]) for side in rounds}
    d, t = result["direct"], result["tdask"]
    result["first_response_overhead_ms"] = round(t["first_response_p50_ms"] - d["first_response_p50_ms"], 3)
    result["responses_per_s_ratio"] = round(t["responses_per_s"] / d["responses_per_s"], 3)
    result["first_each_round"] = [sides[0] for sides in order]
    result["settings"] = {k: v for k, v in vars(args).items() if k != "output"}
    result["environment"] = environment()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--responses", type=int, default=100, help="responses per request")
    p.add_argument("--chunk", type=int, default=1000, help="int64 elements per response")
    p.add_argument("--requests", type=int, default=40, help="requests per round and side")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    p.add_argument("--output", type=Path, default=RESULTS, help="where the JSON results go")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    rows = [{"system": side, **{k: v for k, v in result[side].items() if k != "rounds"}}
            for side in ("direct", "tdask")]
    print_table(rows, [("system", "system"), ("first_response_p50_ms", "first response p50 ms"),
                       ("responses_per_s", "responses/s"), ("cpu_busy", "CPU busy")],
                f"Streaming: {args.responses} responses of {args.chunk} int64 per request, one at a time")
    print(f"tdask / direct: first response {result['first_response_overhead_ms']:+.3f} ms, "
          f"responses/s {result['responses_per_s_ratio']:.3f}x")
    print(f"results: {write_json(args.output, result)}")
    print(json.dumps({k: result[k] for k in ("first_response_overhead_ms", "responses_per_s_ratio")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
