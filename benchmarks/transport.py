"""Moving tensors from the encoder's worker to the decoder's worker: TCP vs UCX vs a plain memory copy.

Runs tdask's real path: a ``Source`` replica on one worker keeps a tensor (``keep=True``), and a
``Sink`` replica on another worker receives its reference and fetches it worker to worker. Each
transfer time is the sink call's time minus that of an 8-byte transfer. Run with
``python -m benchmarks.transport`` (``--gpu`` for CuPy tensors on GPU workers over UCX).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SIZES = {"8MB": 8 * 2**20, "128MB": 128 * 2**20}


def memcpy_gbps(nbytes: int, repeat: int) -> float:
    src = np.ones(nbytes // 8, dtype=np.int64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def device_copy_gbps(nbytes: int, repeat: int) -> float:
    import cupy

    src = cupy.ones(nbytes // 8, dtype=cupy.int64)
    dst = cupy.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        cupy.cuda.runtime.deviceSynchronize()
        t = time.perf_counter()
        dst[...] = src
        cupy.cuda.runtime.deviceSynchronize()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


async def measure(protocol: str, repeat: int, gpu: bool) -> list[dict[str, Any]]:
    from distributed import Client

    import tdask
    from tdask.deploy.cluster import start_embedded_cluster

    device = "GPU" if gpu else "CPU"
    cluster = await start_embedded_cluster(
        n_workers=0 if gpu else 2, gpus=2 if gpu else 0, protocol=protocol, scheduler_port=0,
        dashboard_address=":0")
    rows = []
    try:
        async with Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True) as client:
            ops = [tdask.OperatorConfig(name, f"transfer_ops:{name.title()}", repository=HERE / "operators",
                                        device=device if name == "source" else ("GPU" if gpu else "CPU"))
                   for name in ("source", "sink")]
            async with tdask.Deployment(client, ops) as deployment:
                workers = {r["name"]: r["worker"] for r in deployment.replicas}
                assert workers["source"] != workers["sink"], "source and sink must be on different workers"
                async with await tdask.connect(client) as session:
                    source, sink = await session.operator("source"), await session.operator("sink")

                    async def once(nbytes: int) -> tuple[float, dict]:
                        ref = await source.infer(parameters={"nbytes": nbytes}, keep=True)
                        t = time.perf_counter()
                        out = await sink.infer({"input": ref["output"]})
                        return time.perf_counter() - t, out

                    base = [(await once(8))[0] for _ in range(repeat)]
                    baseline = statistics.median(base)
                    for label, nbytes in SIZES.items():
                        await once(nbytes)  # warm up (connections, allocation)
                        times = []
                        for _ in range(repeat):
                            dt, out = await once(nbytes)
                            assert int(out["nbytes"][0]) == nbytes
                            assert int(out["last"][0]) == nbytes // 8 - 1
                            assert bool(out["on_gpu"][0]) == gpu, "GPU tensors must arrive on the GPU"
                            times.append(dt)
                        best = min(times)
                        rows.append({
                            "protocol": protocol, "device": device, "size": label, "nbytes": nbytes,
                            "latency_ms_p50": statistics.median(times) * 1e3, "latency_ms_best": best * 1e3,
                            "small_call_ms": baseline * 1e3,
                            # no slower than an 8-byte call: lent through shared memory, no bytes moved
                            "gbps": nbytes / (best - baseline) / 1e9 if best > baseline else None,
                        })
    finally:
        await cluster.close()
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['protocol']} {r['size']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, [r["gbps"] or 0.0 for r in rows], color=["#4c72b0" if r["protocol"] != "memcpy" else "#999"
                                                      for r in rows])
    ax.set_ylabel("GB/s")
    ax.set_title("tdask worker-to-worker tensor transfer")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transport", description=__doc__)
    p.add_argument("--protocols", default="tcp,ucx", help="comma-separated: tcp, ucx")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--gpu", action="store_true", help="CuPy tensors on two GPU workers (needs 2 GPUs... or 1 shared)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for transport.json and transport.png")
    p.add_argument("--sizes", default="8MB,128MB", help="comma-separated subset of 8MB,128MB")
    args = p.parse_args(argv)
    for key in list(SIZES):
        if key not in args.sizes.split(","):
            del SIZES[key]
    os.environ.setdefault("UCX_TLS", "tcp,sm,self" if not args.gpu else "tcp,cuda_copy,cuda_ipc,sm,self")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    rows = []
    for label, nbytes in SIZES.items():
        gbps = device_copy_gbps(nbytes, args.repeat) if args.gpu else memcpy_gbps(nbytes, args.repeat)
        rows.append({"protocol": "memcpy", "device": "GPU" if args.gpu else "CPU", "size": label, "nbytes": nbytes,
                     "latency_ms_p50": nbytes / gbps / 1e6, "latency_ms_best": nbytes / gbps / 1e6,
                     "small_call_ms": 0.0, "gbps": gbps})
    for protocol in args.protocols.split(","):
        rows.extend(asyncio.run(measure(protocol, args.repeat, args.gpu)))
    print(f"{'protocol':8} {'device':6} {'size':6} {'GB/s':>8} {'p50 ms':>9} {'best ms':>9} {'8-byte call ms':>15}")
    for r in rows:
        gbps = f"{r['gbps']:8.2f}" if r["gbps"] is not None else "  no copy"
        print(f"{r['protocol']:8} {r['device']:6} {r['size']:6} {gbps} {r['latency_ms_p50']:9.2f} "
              f"{r['latency_ms_best']:9.2f} {r['small_call_ms']:15.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-gpu" if args.gpu else ""
    (out / f"transport{suffix}.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / f"transport{suffix}.png")
    print(f"wrote {out / f'transport{suffix}.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
