"""Load with faults, while serving: worker loss, a Triton crash, an overload burst, bad input, a stopped
(SIGSTOP) worker and hostile peers on a worker's socket, on an embedded cluster; then, on ``dask scheduler`` /
``dask worker`` / ``python -m deploy`` processes: the deploy command killed (foreground and detached) and the
scheduler killed.

Prints, per phase and in total: sent / answered correctly / explicit errors / wrong / lost /
duplicated, and the time each fault took to recover from; saves ``results/chaos.json``.
``lost`` (a request that got neither its answer nor an explicit error) and ``duplicated`` (more than one
answer) must be 0.

    python -m benchmarks.chaos [--seconds-per-phase 8] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tdask import compat
from tdask.compat import TimeoutErrors

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = ROOT / "operators" / "triton_core_models"


class Ledger:
    """Every request sent, and every answer delivered for it."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}

    def sent(self, rid: str) -> None:
        self.answers[rid] = []

    def answered(self, rid: str, outcome: str) -> None:
        self.answers[rid].append(outcome)

    async def call(self, operator: Any, x: np.ndarray, params: dict | None, timeout: float, rid: str) -> str:
        """One request, counted: its answer (checked), or the explicit error it ended with."""
        import tdask

        self.sent(rid)
        try:
            r = await operator.infer({"input": x}, params, request_id=rid, timeout=timeout)
            outcome = "correct" if np.array_equal(r["output"], x) else "wrong"
        except tdask.TdaskError as e:
            outcome = type(e).__name__
        except OSError as e:  # a connection error that is not tdask's: still an answer, named
            outcome = type(e).__name__
        self.answered(rid, outcome)
        return rid

    def summary(self, rids: list[str] | None = None) -> dict[str, int]:
        rids = list(self.answers) if rids is None else rids
        c: Counter = Counter()
        for rid in rids:
            got = self.answers[rid]
            c["sent"] += 1
            if not got:
                c["lost"] += 1
                continue
            if len(got) > 1:
                c["duplicated"] += 1
            first = got[0]
            c["correct" if first == "correct" else ("wrong" if first == "wrong" else "explicit_error")] += 1
            if first not in ("correct", "wrong"):
                c[f"error:{first}"] += 1
        return {k: c.get(k, 0) for k in ("sent", "correct", "explicit_error", "wrong", "lost", "duplicated")} | {
            k: v for k, v in c.items() if k.startswith("error:")}


async def cut_off(sock: socket.socket, timeout: float) -> bool:
    """Whether the worker ends the connection within ``timeout`` (what it sends is read and dropped)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        async with compat.timeout(timeout):
            while await loop.sock_recv(sock, 65536):
                pass
        return True
    except TimeoutErrors:
        return False
    except OSError:
        return True
    finally:
        sock.close()


async def sent(sock: socket.socket, data: bytes) -> bool:
    """Sends ``data`` without blocking the loop; False when the worker ended the connection first."""
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), 30)
        return True
    except OSError:  # cut off while sending
        return False


async def hostile_peers(host: str, port: int, token: str) -> dict[str, bool]:
    """Peers that misbehave on a worker's request-stream socket, and whether the worker cut each off."""
    from distributed.comm import connect

    from tdask.comm import protocol
    from tdask.comm.stream import open_stream

    loop = asyncio.get_running_loop()

    async def raw() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        return sock

    async def member():  # a peer that knows the token: a member of the cluster gone rogue
        comm = await connect(f"tdask://{host}:{port}", timeout=5)
        await comm.write({"op": protocol.STREAM_HANDLER, "reply": False})
        await open_stream(comm, 5, token)
        return comm

    out: dict[str, bool] = {}
    sock = await raw()
    out["random bytes"] = not await sent(sock, np.random.default_rng(1).bytes(1 << 20)) or await cut_off(sock, 10)
    comm = await connect(f"tdask://{host}:{port}", timeout=5)
    await comm.write({"op": protocol.STREAM_HANDLER, "reply": False})
    await comm.write(protocol.hello(b"", token="guessed"))
    try:
        answer = await comm.read()  # the refusal, saying why (best effort: the worker may close first)
    except OSError:
        answer = {"error": "closed"}
    out["no token: refused, host not told"] = bool(answer.get("error")) and not answer.get("host")
    comm.abort()
    for name, words in (("a 16 GiB frame", [1, 16 << 30]), ("a negative length", [1, 2**64 - 1])):
        comm = await member()
        sock = comm.socket.dup()
        comm.abort()
        out[name] = not await sent(sock, struct.pack(f"<{len(words)}Q", *words)) or await cut_off(sock, 10)
    silent = [await raw() for _ in range(50)]
    cut = await asyncio.gather(*(cut_off(s, 30) for s in silent))
    out["50 silent connections"] = all(cut)
    return out


async def process_phases(args: argparse.Namespace, ledger: Ledger) -> list[dict[str, Any]]:
    """The faults that take processes tdask does not own: ``dask scheduler`` and ``dask worker`` processes, the
    deploy command killed (foreground, then detached), then the scheduler killed, each under load."""
    import tdask

    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONUNBUFFERED": "1"}
    logs = Path(args.out) / "chaos-logs"
    logs.mkdir(parents=True, exist_ok=True)
    dask_bin = os.path.join(os.path.dirname(sys.executable), "dask")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    procs: list[subprocess.Popen] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=open(logs / f"{name}.log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    async def until(name: str, needle: str, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while needle not in (logs / f"{name}.log").read_text():
            if time.monotonic() > end:
                raise RuntimeError(f"{name}: no {needle!r} within {timeout} s")
            await asyncio.sleep(0.2)

    phases: list[dict[str, Any]] = []
    counter = iter(range(10**9))
    rng = np.random.default_rng(1)
    try:
        scheduler = start("scheduler", [dask_bin, "scheduler", "--host", "127.0.0.1", "--port",
                                        address.rsplit(":", 1)[1], "--dashboard-address", ":0"])
        await until("scheduler", "Scheduler at:")
        for i in range(2):
            start(f"worker{i}", [dask_bin, "worker", address, "--nthreads", "1", "--name", f"w{i}",
                                 "--host", "127.0.0.1"])
            await until(f"worker{i}", "Starting established connection")
        async with await tdask.connect(address) as session:

            async def load(seconds: float) -> list[str]:
                op = await session.operator("encoder_decoder")
                rids: list[str] = []
                end = time.monotonic() + seconds

                async def loop_() -> None:
                    while time.monotonic() < end:
                        rids.append(await ledger.call(op, rng.integers(0, 1000, size=args.size), None, args.timeout,
                                                      f"p{next(counter)}"))

                await asyncio.gather(*(loop_() for _ in range(args.concurrency)))
                return rids

            # deploy killed in the foreground: it owned its deployment, whose replicas go with it
            deploy = start("deploy", [sys.executable, "-m", "deploy", "--scheduler-address", address])
            await until("deploy", "press Ctrl-C to Exit")
            task = asyncio.ensure_future(load(args.seconds_per_phase))
            await asyncio.sleep(args.seconds_per_phase / 4)
            deploy.kill()
            rids = await task
            phases.append({"phase": "foreground deploy SIGKILL", **ledger.summary(rids), "recovery_s": 0.0,
                           "recovery": "none: a foreground deploy owns its deployment (requests after it end "
                                       "with explicit errors)"})
            await asyncio.sleep(3)  # the workers stop the released replicas
            # deploy detached, and its command killed: the scheduler holds the deployment
            detached = start("detach", [sys.executable, "-m", "deploy", "--scheduler-address", address, "--detach"])
            await until("detach", "Workers started")
            detached.kill()
            task = asyncio.ensure_future(load(args.seconds_per_phase))
            rids = await task
            phases.append({"phase": "detached deploy's command SIGKILL", **ledger.summary(rids), "recovery_s": 0.0,
                           "recovery": "none needed: the scheduler holds the deployment"})
            # the scheduler killed under load: every request ends, answered or with an explicit error
            task = asyncio.ensure_future(load(args.seconds_per_phase))
            await asyncio.sleep(args.seconds_per_phase / 4)
            t0 = time.monotonic()
            scheduler.kill()
            rids = await task
            phases.append({"phase": "scheduler SIGKILL", **ledger.summary(rids),
                           "recovery_s": round(time.monotonic() - t0, 2),
                           "recovery": "none: the cluster is gone; seconds until every request had ended"})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return phases


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from distributed import Client

    import tdask
    from tdask.deploy.cluster import start_embedded_cluster
    from tdask.registry import token_key

    cluster = await start_embedded_cluster(n_workers=5, scheduler_port=0, dashboard_address=":0")
    ledger = Ledger()
    phases: list[dict[str, Any]] = []
    try:
        async with Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True) as client:
            ops = [tdask.OperatorConfig("encoder", repository=MODELS, replicas=2, max_inflight=8),
                   tdask.OperatorConfig("decoder", repository=MODELS, replicas=2, max_inflight=8),
                   tdask.OperatorConfig("encoder_decoder", "encoder_decoder:EncoderDecoder",
                                        repository=ROOT / "operators", max_inflight=64, max_queue_size=64)]
            async with tdask.Deployment(client, ops) as deployment:
                async with await tdask.connect(client) as session:
                    op = await session.operator("encoder_decoder")
                    counter = iter(range(10**9))
                    rng = np.random.default_rng(0)

                    async def one(x: np.ndarray, params: dict | None = None, operator: Any = op,
                                  timeout: float | None = None) -> str:
                        return await ledger.call(operator, x, params, timeout or args.timeout, f"r{next(counter)}")

                    async def load(seconds: float) -> list[str]:
                        return await load_with(args, seconds)

                    async def load_with(settings: argparse.Namespace, seconds: float) -> list[str]:
                        rids: list[str] = []
                        end = time.monotonic() + seconds

                        async def loop_() -> None:
                            while time.monotonic() < end:
                                x = rng.integers(0, 1000, size=settings.size)
                                rids.append(await one(x, timeout=settings.timeout))

                        await asyncio.gather(*(loop_() for _ in range(settings.concurrency)))
                        return rids

                    async def first_success_after(t0: float) -> float:
                        while True:
                            rid = await one(np.arange(5))
                            if ledger.answers[rid][0] == "correct":
                                return time.monotonic() - t0
                            await asyncio.sleep(0.05)

                    # 1. worker loss
                    victim = next(r for r in deployment.replicas if r["name"] == "encoder")
                    pids = await client.run(os.getpid)
                    task = asyncio.ensure_future(load(args.seconds_per_phase))
                    await asyncio.sleep(args.seconds_per_phase / 4)
                    t0 = time.monotonic()
                    os.kill(pids[victim["worker"]], signal.SIGKILL)
                    while not any(e["event"] == "placed" for e in deployment.events):
                        await asyncio.sleep(0.1)
                    replaced = time.monotonic() - t0
                    rids = await task
                    phases.append({"phase": "worker SIGKILL (encoder replica)", **ledger.summary(rids),
                                   "recovery_s": round(replaced, 2),
                                   "recovery": "replica placed again on the restarted worker"})
                    # 2. Triton crash
                    decoder = next(r for r in deployment.replicas if r["name"] == "decoder")
                    task = asyncio.ensure_future(load(args.seconds_per_phase))
                    await asyncio.sleep(args.seconds_per_phase / 4)
                    t0 = time.monotonic()
                    os.kill(decoder["triton_pid"], signal.SIGKILL)

                    def restarts(dask_worker: Any) -> int:
                        return dask_worker.extensions["tdask"].stats()["triton_restarts"]

                    while (await client.run(restarts, workers=[decoder["worker"]]))[decoder["worker"]] < 1:
                        await asyncio.sleep(0.1)
                    restarted = time.monotonic() - t0
                    rids = await task
                    phases.append({"phase": "Triton server SIGKILL (decoder)", **ledger.summary(rids),
                                   "recovery_s": round(restarted, 2), "recovery": "server restarted, models reloaded"})
                    # 3. overload: 10x the queue at once
                    t0 = time.monotonic()
                    burst = await asyncio.gather(*(one(np.arange(1000)) for _ in range(10 * 64 + 64)))
                    back = await first_success_after(t0)
                    phases.append({"phase": "overload burst (10x queue)", **ledger.summary(list(burst)),
                                   "recovery_s": round(back, 2), "recovery": "first correct answer after the burst"})
                    # 4. bad input mixed into valid load
                    encoder = await session.operator("encoder")
                    bad = [np.arange(5, dtype=np.float32), np.zeros((2, 2), dtype=np.int64)]
                    task = asyncio.ensure_future(load(args.seconds_per_phase / 2))
                    bad_rids = await asyncio.gather(*(one(bad[i % 2], operator=encoder) for i in range(200)))
                    rids = await task
                    summary = ledger.summary(list(bad_rids))
                    phases.append({"phase": "200 malformed requests (bad input)", **summary,
                                   "valid_during": ledger.summary(rids), "recovery_s": 0.0,
                                   "recovery": "no recovery needed: valid requests unaffected"})
                    # 5. a worker stopped (SIGSTOP) for a while, then continued: what it held ends by timeout
                    victim = next(r for r in deployment.replicas if r["name"] == "decoder")
                    pids = await client.run(os.getpid)
                    short = argparse.Namespace(**{**vars(args), "timeout": args.stopped_seconds / 2})
                    task = asyncio.ensure_future(load_with(short, args.seconds_per_phase + args.stopped_seconds))
                    await asyncio.sleep(args.seconds_per_phase / 4)
                    os.kill(pids[victim["worker"]], signal.SIGSTOP)
                    t0 = time.monotonic()
                    await asyncio.sleep(args.stopped_seconds)
                    os.kill(pids[victim["worker"]], signal.SIGCONT)
                    back = await first_success_after(t0) - args.stopped_seconds
                    rids = await task
                    phases.append({"phase": f"worker SIGSTOP for {args.stopped_seconds:g} s (decoder replica)",
                                   **ledger.summary(rids), "recovery_s": round(max(back, 0.0), 2),
                                   "recovery": "first correct answer after SIGCONT"})
                    # 6. hostile peers on a worker's request-stream socket, while the load goes on
                    target = next(r for r in deployment.replicas if r["name"] == "encoder")["worker"]
                    port = (await client.rpc(target).tdask_stream_socket())["port"]
                    token = await client.get_metadata(token_key(target))
                    task = asyncio.ensure_future(load(args.seconds_per_phase))
                    hostile = await hostile_peers("127.0.0.1", port, token)
                    rids = await task
                    phases.append({"phase": "hostile peers on a worker's socket", **ledger.summary(rids),
                                   "hostile": hostile, "recovery_s": 0.0,
                                   "recovery": f"{sum(hostile.values())} of {len(hostile)} hostile connections cut "
                                               "off; valid requests unaffected"})
    finally:
        await cluster.close()
    if not args.no_processes:
        phases += await process_phases(args, ledger)
    total = ledger.summary()
    return {"phases": phases, "total": total, "settings": vars(args)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds-per-phase", type=float, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", type=int, default=1000, help="int64 elements per request")
    p.add_argument("--timeout", type=float, default=30, help="per-request timeout, seconds")
    p.add_argument("--stopped-seconds", type=float, default=6, help="how long the SIGSTOP phase stops a worker")
    p.add_argument("--no-processes", action="store_true",
                   help="skip the phases on dask scheduler / dask worker / python -m deploy processes")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    report = asyncio.run(run(args))
    cols = ["sent", "correct", "explicit_error", "wrong", "lost", "duplicated", "recovery_s"]
    print("| phase | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for ph in report["phases"]:
        print(f"| {ph['phase']} | " + " | ".join(str(ph.get(c, 0)) for c in cols) + " |")
    print("| total | " + " | ".join(str(report["total"].get(c, "")) for c in cols[:-1]) + " | |")
    for ph in report["phases"]:
        errors = {k: v for k, v in ph.items() if k.startswith("error:")}
        print(f"{ph['phase']}: errors {errors}; recovery: {ph['recovery']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=2))
    ok = report["total"]["lost"] == 0 and report["total"]["duplicated"] == 0 and report["total"]["wrong"] == 0
    print(f"wrote {out / 'chaos.json'}; lost={report['total']['lost']} duplicated={report['total']['duplicated']}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
