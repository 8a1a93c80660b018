"""Direct Triton (tritonclient gRPC) vs the tdask pipeline vs tdask chained futures, side by side.

One run, one machine, the same ``operators/triton_core_models`` with the same instance counts:

* ``direct``: one Triton server (started with :class:`tdask.triton.server.TritonServer`, with the
  allocator settings tdask's servers get from their worker) hosting encoder and decoder; each request
  calls encoder, then decoder with the returned ``input_copies`` through one ``tritonclient.grpc.aio``
  client, and checks the output.
* ``direct_sync``: the same server and calls through ``tritonclient.grpc``'s blocking client, one client per
  thread, ``concurrency`` threads (the form of Triton's own examples).
* ``direct_shm``: ``direct_sync`` with every tensor in Triton's system shared memory, the encoder's output region
  the decoder's input (sizes of at least ``--shm-min-size`` elements).
* ``tdask_pipeline``: the hello-world deployment (encoder, decoder, encoder_decoder) on an embedded
  cluster, on one worker (``--workers 1``, one Triton server like direct) or one worker each
  (``--workers 3``, deploy's placement); requests go to ``encoder_decoder``.
* ``tdask_chained``: the caller passes the encoder's future into the decoder call.
* ``tdask_pipeline_deploy_layout``: the pipeline again, placed as ``python -m deploy`` places it by default
  (encoder, decoder and encoder_decoder on a worker each), on an embedded cluster of its own that lives beside
  the main one while the cells run (``--no-deploy-layout``: not measured; not with ``--workers 3``).

Cells are measured interleaved (the direct forms, pipeline, chained, deploy's layout, repeated ``--rounds``
times) so the ratios come from the same conditions: each tdask row's against the cell's strongest direct form (its
``reference``, the one of highest throughput) and against ``direct``, each the median over rounds of the
per-round ratio. Then scaling (1..N replicas of encoder, decoder and
encoder_decoder on one worker per core, each model sleeping ``--scaling-delay-ms`` per request)
and a memory run (peak RSS per process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks import frontdoor
from benchmarks.common import (
    RESULTS,
    CpuBusy,
    Measurement,
    ShmDirect,
    StockClient,
    SyncDirect,
    check,
    environment,
    int_list,
    median_of_rounds,
    plot,
    print_table,
    ratio,
    run_load,
    run_threads,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
OPERATORS = ROOT / "operators"
MODELS = OPERATORS / "triton_core_models"
DEPLOY_LAYOUT = "tdask_pipeline_deploy_layout"
DEPLOY_WORKERS = 3  # deploy's default placement: encoder, decoder and encoder_decoder on a worker each

# the forms of calling Triton directly (--direct) and their rows
DIRECT_FORMS = {"async": "direct", "sync": "direct_sync", "shm": "direct_shm"}

Call = Callable[[np.ndarray], Awaitable[None]]
Load = Callable[..., Awaitable[tuple[list[float], float, int, str | None]]]  # (x, concurrency, duration=, requests=)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="a seconds-long run of every part of the harness (numbers meaningless)")
    p.add_argument("--sizes", type=int_list, default=None, help="int64 elements per request (default 1000,1000000)")
    p.add_argument("--concurrency", type=int_list, default=None, help="requests in flight (default 1,4,16,64)")
    p.add_argument("--duration", type=float, default=None, help="seconds per system per round and cell (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 2)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes of the main deployment: 1 co-locates encoder, decoder and "
                        "encoder_decoder (one Triton server, like direct); 3 gives each its own worker "
                        "(deploy's default placement)")
    p.add_argument("--deploy-layout", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also measure the pipeline with deploy's default placement ({DEPLOY_LAYOUT}: a "
                        f"cluster of {DEPLOY_WORKERS} workers beside the main one, in the same interleaved cells)")
    p.add_argument("--direct", type=direct_forms, default="async,sync,shm",
                   help="forms of calling Triton directly: async (one tritonclient.grpc.aio client: the 'direct' "
                        "row of older results), sync (tritonclient.grpc, a client per thread), shm (sync with "
                        "every tensor in system shared memory); tdask's ratios are against the strongest of a cell")
    p.add_argument("--shm-min-size", type=int, default=100_000,
                   help="the shm form runs for sizes of at least this many elements (below, the messages are "
                        "small and registering regions buys nothing)")
    p.add_argument("--instances", type=int, default=2,
                   help="Triton model instances of encoder and decoder (both sides)")
    p.add_argument("--max-inflight", type=int, default=16, help="tdask max in-flight per encoder/decoder replica")
    p.add_argument("--pipeline-max-inflight", type=int, default=256, help="tdask max in-flight of encoder_decoder")
    p.add_argument("--scaling", type=int_list, default=None, help="replica counts for scaling (default 1,2,4,8)")
    p.add_argument("--scaling-delay-ms", type=float, default=None,
                   help="sleep of each encoder and decoder request in the scaling run (default 20, the issue's "
                        "'each request sleeps about 20 ms'; at 10 the 2 cores, not routing, limit 8 replicas)")
    p.add_argument("--scaling-size", type=int, default=1000, help="elements per scaling request")
    p.add_argument("--scaling-workers", type=int, default=None,
                   help="worker processes of the scaling run (default: one per CPU core, at most the largest "
                        "replica count); replicas on one worker share its Triton server and add up instances")
    p.add_argument("--memory-requests", type=int, default=None, help="requests of the memory run (default 100000)")
    p.add_argument("--memory-concurrency", type=int, default=64)
    p.add_argument("--set", dest="settings", action="append", default=[], type=setting, metavar="KEY=VALUE",
                   help="a Dask setting for this run's tdask processes, e.g. tdask.lanes.enabled=false to measure "
                        "without lanes (repeatable; python -m benchmarks.mechanisms measures each mechanism on and "
                        "off side by side)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: cells,frontdoor,scaling,memory")
    p.add_argument("--output", default=None, help="JSON result file (default benchmarks/results/pipeline[-smoke].json)")
    p.add_argument("--no-plot", action="store_true")
    return p


def direct_forms(text: str) -> list[str]:
    """``"sync,shm"`` -> ``["sync", "shm"]``, each one of :data:`DIRECT_FORMS`."""
    forms = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(forms) - set(DIRECT_FORMS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown direct forms {unknown} (known: {', '.join(DIRECT_FORMS)})")
    return forms


def setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``, the value read as YAML (``false``, ``0``, ``2s``)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    smoke = args.smoke
    defaults = {
        "sizes": [1000, 200_000] if smoke else [1000, 1_000_000],
        "concurrency": [1, 4] if smoke else [1, 4, 16, 64],
        "duration": 0.25 if smoke else 3.0,
        "rounds": 1 if smoke else 2,
        "scaling": [1, 2] if smoke else [1, 2, 4, 8],
        "scaling_delay_ms": 20.0,
        "memory_requests": 200 if smoke else 100_000,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output is None:
        args.output = str(RESULTS / ("pipeline-smoke.json" if smoke else "pipeline.json"))
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if isinstance(args.direct, str):  # argparse leaves a string default unparsed
        args.direct = direct_forms(args.direct)
    args.deploy_layout = args.deploy_layout and args.workers != DEPLOY_WORKERS  # else the main one is it
    return args


# -- the three systems -------------------------------------------------------------------
class Tdask:
    def __init__(self, session: Any) -> None:
        self.session = session

    async def setup(self) -> None:
        self.pipeline = await self.session.operator("encoder_decoder")
        self.encoder = await self.session.operator("encoder")
        self.decoder = await self.session.operator("decoder")

    async def call_pipeline(self, x: np.ndarray) -> None:
        result = await self.pipeline.infer({"input": x})
        check(x, result["output"])

    async def call_chained(self, x: np.ndarray) -> None:
        encoded = self.encoder.infer({"input": x}, keep="auto")
        input_copies = int((await encoded)["input_copies"][0])
        result = await self.decoder.infer({"input": encoded.output("output")}, {"input_copies": input_copies})
        check(x, result["output"])


# -- setup --------------------------------------------------------------------------------
async def load_direct_models(server: Any, instances: int, delay_s: float = 0.0) -> None:
    from tdask.triton.model_config import merge_model_config, read_model_config

    for name in ("encoder", "decoder"):
        cfg = merge_model_config(read_model_config(MODELS, name), name=name, instance_count=instances,
                                 device="CPU", parameters={"delay": delay_s} if delay_s else None)
        await server.load_model(name, cfg)


def tdask_configs(instances: int, max_inflight: int, pipeline_max_inflight: int, replicas: int = 1,
                  delay_s: float = 0.0) -> list[Any]:
    from tdask import OperatorConfig

    params = {"delay": delay_s} if delay_s else {}
    return [
        OperatorConfig("encoder", "TritonCoreOperator", repository=MODELS, replicas=replicas,
                       instances=instances, max_inflight=max_inflight, parameters=params),
        OperatorConfig("decoder", "TritonCoreOperator", repository=MODELS, replicas=replicas,
                       instances=instances, max_inflight=max_inflight, parameters=params),
        OperatorConfig("encoder_decoder", "encoder_decoder:EncoderDecoder", repository=OPERATORS,
                       replicas=replicas, max_inflight=pipeline_max_inflight),
    ]


# -- memory sampling ------------------------------------------------------------------------
def _label(proc: psutil.Process, me: int, direct_pid: int | None) -> str:
    try:
        if proc.pid == me:
            return "benchmark client + scheduler"
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
    if proc.pid == direct_pid:
        return "direct tritonserver"
    if "triton_python_backend_stub" in cmd:
        return "triton python stub"
    if "tritonserver" in cmd:
        return "tdask tritonserver"
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "multiprocessing" in cmd or "distributed" in cmd:
        return "dask worker"
    return cmd[:40]


class RssSampler:
    """Samples the RSS of this process and all its descendants every ``interval`` seconds."""

    def __init__(self, direct_pid: int | None, interval: float = 0.25) -> None:
        self.direct_pid = direct_pid
        self.interval = interval
        self.samples: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        now = time.monotonic()
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            s = self.samples.get(proc.pid)
            if s is None:
                s = self.samples[proc.pid] = {"pid": proc.pid, "process": _label(proc, me.pid, self.direct_pid),
                                              "rss_first_mb": rss / 2**20, "rss_peak_mb": 0.0, "first": now}
            s["rss_peak_mb"] = max(s["rss_peak_mb"], rss / 2**20)
            s["rss_last_mb"] = rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for s in sorted(self.samples.values(), key=lambda s: (s["process"], s["pid"])):
            if s["process"] in ("resource tracker", "?"):
                continue
            out.append({"process": s["process"], "pid": s["pid"], "rss_start_mb": round(s["rss_first_mb"], 1),
                        "rss_peak_mb": round(s["rss_peak_mb"], 1), "rss_end_mb": round(s["rss_last_mb"], 1)})
        return out


# -- the run ------------------------------------------------------------------------------
def async_load(call: Call) -> Load:
    async def load(x: np.ndarray, concurrency: int, duration: float | None = None,
                   requests: int | None = None) -> tuple[list[float], float, int, str | None]:
        return await run_load(call, x, concurrency, duration=duration, requests=requests)
    return load


def thread_load(direct: SyncDirect) -> Load:
    """A blocking direct form's load, off the event loop (which keeps serving the tdask side's scheduler)."""
    async def load(x: np.ndarray, concurrency: int, duration: float | None = None,
                   requests: int | None = None) -> tuple[list[float], float, int, str | None]:
        await asyncio.to_thread(direct.prepare, x, concurrency)  # clients (and regions) once, not per request
        return await asyncio.to_thread(run_threads, direct.call, x, concurrency, duration, requests)
    return load


def compare(systems: dict[str, dict[str, Any]]) -> str | None:
    """Each row's ratios against the cell's strongest direct form (returned: its name) and tdask's rows' against
    ``direct`` too (``*_vs_async``); medians over the interleaved rounds."""
    directs = [s for s in systems if s in DIRECT_FORMS.values()]
    reference = max(directs, key=lambda s: systems[s]["throughput"] or 0.0, default=None)
    for name, s in systems.items():
        if reference is not None and name != reference:
            ref = systems[reference]
            s["throughput_ratio"], s["p50_overhead_ms"] = median_of_rounds(s, ref)
            s["p50_ratio"] = ratio(s["p50_ms"], ref["p50_ms"])
        if name not in DIRECT_FORMS.values() and "direct" in systems:
            s["throughput_ratio_vs_async"], s["p50_overhead_ms_vs_async"] = median_of_rounds(s, systems["direct"])
    return reference


async def measure_cells(args: argparse.Namespace, direct: StockClient, td: Tdask,
                        deploy_layout: Tdask | None = None, direct_url: str | None = None) -> list[dict[str, Any]]:
    """Every (size, concurrency) cell; the blocking direct forms need ``direct_url`` (the server's gRPC address)."""
    blocking: dict[str, SyncDirect] = {}
    if direct_url is not None and "sync" in args.direct:
        blocking["direct_sync"] = SyncDirect(direct_url)
    if direct_url is not None and "shm" in args.direct:
        blocking["direct_shm"] = ShmDirect(direct_url)
    loads: dict[str, Load] = {"direct": async_load(direct.direct)} if "async" in args.direct else {}
    loads.update({name: thread_load(d) for name, d in blocking.items()})
    loads.update(tdask_pipeline=async_load(td.call_pipeline), tdask_chained=async_load(td.call_chained))
    if deploy_layout is not None:
        loads[DEPLOY_LAYOUT] = async_load(deploy_layout.call_pipeline)
    cells = []
    try:
        for size in args.sizes:
            x = np.arange(size, dtype=np.int64)
            mine = {s: load for s, load in loads.items() if s != "direct_shm" or size >= args.shm_min_size}
            for load in mine.values():  # warm-up: connections, first-call costs
                await load(x, 1, requests=2)
            for conc in args.concurrency:
                ms = {s: Measurement(s) for s in mine}
                cpu = {s: CpuBusy() for s in mine}
                for _ in range(args.rounds):
                    for system, load in mine.items():
                        cpu[system].start()
                        ms[system].add(*await load(x, conc, duration=args.duration))
                        cpu[system].stop()
                systems = {s: {**m.summary(), "cpu_busy": cpu[s].fraction} for s, m in ms.items()}
                reference = compare(systems)
                cells.append({"size": size, "concurrency": conc, "reference": reference, "systems": systems})
                print(f"size {size} concurrency {conc} (reference {reference}): " + ", ".join(
                    f"{s} {v['throughput']}/s p50 {v['p50_ms']} ms errors {v['errors']}" for s, v in systems.items()),
                    flush=True)
    finally:
        for name, d in blocking.items():
            await asyncio.to_thread(d.close)
            for problem in getattr(d, "cleanup_errors", []):
                print(f"{name} cleanup: {problem}", file=sys.stderr, flush=True)
    return cells


@contextlib.asynccontextmanager
async def embedded_client(n_workers: int) -> AsyncIterator[Any]:
    """An async client of an embedded cluster of ``n_workers`` of its own, for as long as it is used."""
    from distributed import Client

    from tdask.deploy.cluster import start_embedded_cluster

    cluster = await start_embedded_cluster(n_workers=n_workers, scheduler_port=0, dashboard_address=":0",
                                           silence_logs=logging.ERROR)
    try:
        async with Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True) as client:
            yield client
    finally:
        await cluster.close()


@contextlib.asynccontextmanager
async def deployed(client: Any, configs: list[Any]) -> AsyncIterator[Tdask]:
    """``configs`` deployed on ``client``'s cluster, with a session to call them, for as long as it is used."""
    import tdask
    from tdask import Deployment

    deployment = Deployment(client, configs)
    await deployment.start()
    try:
        async with await tdask.connect(client) as session:
            td = Tdask(session)
            await td.setup()
            yield td
    finally:
        await deployment.stop()


@contextlib.asynccontextmanager
async def hello_world(args: argparse.Namespace, n_workers: int) -> AsyncIterator[Tdask]:
    """The hello-world deployment of the cells on an embedded cluster of ``n_workers`` of its own."""
    configs = tdask_configs(args.instances, args.max_inflight, args.pipeline_max_inflight)
    async with embedded_client(n_workers) as client, deployed(client, configs) as td:
        yield td


async def measure_scaling(args: argparse.Namespace, client: Any, direct_server: Any) -> list[dict[str, Any]]:
    delay_s = args.scaling_delay_ms / 1e3 / args.scaling_size
    x = np.arange(args.scaling_size, dtype=np.int64)
    rows = []
    for n in args.scaling:
        conc = 4 * n
        await load_direct_models(direct_server, n, delay_s)
        direct = StockClient("grpc", direct_server.grpc_url)
        configs = tdask_configs(1, args.max_inflight, args.pipeline_max_inflight, replicas=n, delay_s=delay_s)
        try:
            async with deployed(client, configs) as td:
                ms = {"direct": Measurement("direct"), "tdask_pipeline": Measurement("tdask_pipeline")}
                cpu = {"direct": CpuBusy(), "tdask_pipeline": CpuBusy()}
                calls = {"direct": direct.direct, "tdask_pipeline": td.call_pipeline}
                for call in calls.values():
                    await run_load(call, x, conc, requests=conc)
                for _ in range(args.rounds):
                    for system, call in calls.items():
                        cpu[system].start()
                        ms[system].add(*await run_load(call, x, conc, duration=args.duration))
                        cpu[system].stop()
        finally:
            await direct.close()
        systems = {s: {**m.summary(), "cpu_busy": cpu[s].fraction} for s, m in ms.items()}
        systems["tdask_pipeline"]["throughput_ratio"] = ratio(systems["tdask_pipeline"]["throughput"],
                                                              systems["direct"]["throughput"])
        rows.append({"replicas": n, "concurrency": conc, "systems": systems})
        print(f"scaling {n} replicas: " + ", ".join(f"{s} {v['throughput']}/s" for s, v in systems.items()),
              flush=True)
    base = rows[0]["systems"]["tdask_pipeline"]["throughput"] if rows else None
    for row in rows:
        t = row["systems"]["tdask_pipeline"]["throughput"]
        row["efficiency"] = round(t / (base * row["replicas"] / rows[0]["replicas"]), 3) if t and base else None
    await load_direct_models(direct_server, args.instances)
    return rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import dask.config

    from tdask.deploy.cluster import worker_environ
    from tdask.triton.server import TritonServer

    # Triton's Python stub takes its site-packages from the first python3 on PATH.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    dask.config.set({"distributed.worker.daemon": False})  # workers start Triton subprocesses
    dask.config.set(dict(args.settings))  # before any cluster starts: its workers take this config
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "title": "tdask vs direct Triton" + (" (smoke run: numbers meaningless)" if args.smoke else ""),
        "smoke": args.smoke,
        "environment": environment(),
        "settings": {
            "sizes": args.sizes, "concurrency": args.concurrency, "duration_s": args.duration,
            "rounds": args.rounds, "workers": args.workers,
            "direct_forms": [DIRECT_FORMS[f] for f in args.direct],
            "shm_min_size": args.shm_min_size if "shm" in args.direct else None,
            "deploy_layout_workers": DEPLOY_WORKERS if args.deploy_layout else None,
            "instances": args.instances,
            "max_inflight": args.max_inflight,
            "pipeline_max_inflight": args.pipeline_max_inflight, "scaling": args.scaling,
            "scaling_delay_ms_per_model": args.scaling_delay_ms, "scaling_concurrency": "4 x replicas",
            "scaling_workers": args.scaling_workers or min(max(args.scaling), os.cpu_count() or 1),
            "memory_requests": args.memory_requests, "memory_concurrency": args.memory_concurrency,
            "tdask_config": dask.config.get("tdask"), "set": dict(args.settings),
        },
        "cells": [], "frontdoor": [], "scaling": [], "memory": {},
    }
    # the same allocator settings as tdask's Triton servers, which inherit them from their worker
    direct_server = TritonServer(MODELS, environ=worker_environ())
    try:
        await direct_server.start()
        await load_direct_models(direct_server, args.instances)
        if not {"cells", "frontdoor", "memory"} <= args.skip:
            direct = StockClient("grpc", direct_server.grpc_url)
            try:
                async with hello_world(args, args.workers) as td:
                    if "cells" not in args.skip:
                        async with contextlib.AsyncExitStack() as stack:
                            other = (await stack.enter_async_context(hello_world(args, DEPLOY_WORKERS))
                                     if args.deploy_layout else None)
                            results["cells"] = await measure_cells(args, direct, td, other,
                                                                   direct_server.grpc_url)
                    if "frontdoor" not in args.skip:
                        results["frontdoor"] = await frontdoor.measure_frontdoor(args, direct_server,
                                                                                 td.session.client)
                    if "memory" not in args.skip:  # the deploy-layout cluster is gone: every process here is measured
                        results["memory"] = await measure_memory(args, td, direct_server.pid)
            finally:
                await direct.close()
        if "scaling" not in args.skip:
            async with embedded_client(results["settings"]["scaling_workers"]) as client:
                results["scaling"] = await measure_scaling(args, client, direct_server)
    finally:
        await direct_server.stop()
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return results


async def measure_memory(args: argparse.Namespace, td: Tdask, direct_pid: int | None) -> dict[str, Any]:
    x = np.arange(1000, dtype=np.int64)
    with RssSampler(direct_pid) as sampler:
        latencies, elapsed, errors, first_error = await run_load(td.call_pipeline, x, args.memory_concurrency,
                                                                 requests=args.memory_requests)
    m = Measurement("tdask_pipeline")
    m.add(latencies, elapsed, errors, first_error)
    out = {"size": 1000, "concurrency": args.memory_concurrency, "requests": args.memory_requests,
           "result": m.summary(), "processes": sampler.rows()}
    print(f"memory run: {m.summary()}", flush=True)
    return out


def report(results: dict[str, Any]) -> str:
    parts = []
    rows = []
    for cell in results["cells"]:
        for system, s in cell["systems"].items():
            rows.append({"size": cell["size"], "conc": cell["concurrency"], "system": system,
                         "reference": cell.get("reference", "direct"), **s})
    if rows:
        parts.append(print_table(rows, [
            ("size", "elements"), ("conc", "concurrency"), ("system", "system"), ("throughput", "req/s"),
            ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("reference", "reference"), ("throughput_ratio", "thr / ref"),
            ("p50_overhead_ms", "p50 - ref ms"), ("throughput_ratio_vs_async", "thr / direct"),
            ("cpu_busy", "CPU busy"), ("requests", "requests"), ("errors", "errors")],
            "Pipelines: Triton called directly (strongest form: reference) vs tdask"))
    if results.get("frontdoor"):
        parts.append(frontdoor.report(results["frontdoor"]))
    rows = []
    for row in results["scaling"]:
        for system, s in row["systems"].items():
            rows.append({"replicas": row["replicas"], "conc": row["concurrency"], "system": system, **s,
                         "efficiency": row["efficiency"] if system == "tdask_pipeline" else None})
    if rows:
        parts.append(print_table(rows, [
            ("replicas", "replicas"), ("conc", "concurrency"), ("system", "system"), ("throughput", "req/s"),
            ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("throughput_ratio", "thr / direct"),
            ("efficiency", "thr(N) / (N thr(1))"), ("cpu_busy", "CPU busy"), ("errors", "errors")],
            "Scaling (each model call sleeps; concurrency 4 x replicas)"))
    mem = results.get("memory") or {}
    if mem:
        parts.append(print_table(mem["processes"], [
            ("process", "process"), ("pid", "pid"), ("rss_start_mb", "RSS start MB"),
            ("rss_peak_mb", "RSS peak MB"), ("rss_end_mb", "RSS end MB")],
            f"Memory: {mem['requests']} requests at concurrency {mem['concurrency']} "
            f"({mem['result']['throughput']} req/s, {mem['result']['errors']} errors)"))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = resolve_defaults(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.WARNING)
    for name in ("distributed", "tdask"):
        logging.getLogger(name).setLevel(logging.WARNING)
    results = asyncio.run(run(args))
    results["table_markdown"] = report(results)
    out = Path(args.output)
    write_json(out, results)
    print(f"wrote {out}")
    if not args.no_plot and (results["cells"] or results["scaling"]):
        png = plot(out.with_suffix(".png"), results)
        print(f"wrote {png}")
    print(f"total {results['wall_seconds']} s")
    failed = sum(s["errors"] for c in results["cells"] for s in c["systems"].values())
    return 1 if failed and args.smoke else 0
