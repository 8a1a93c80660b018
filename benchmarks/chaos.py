"""Load with faults: worker loss, a Triton crash, an overload burst and bad input, while serving.

Prints, per phase and in total: sent / answered correctly / explicit errors / wrong / lost /
duplicated, and the time each fault took to recover from; saves ``results/chaos.json``.
``lost`` (no answer at all) and ``duplicated`` (more than one answer) must be 0.

    python -m benchmarks.chaos [--seconds-per-phase 8] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

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


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from distributed import Client

    import tdask
    from tdask.deploy.cluster import start_embedded_cluster

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

                    async def one(x: np.ndarray, params: dict | None = None, operator: Any = op) -> str:
                        rid = f"r{next(counter)}"
                        ledger.sent(rid)
                        try:
                            r = await operator.infer({"input": x}, params, request_id=rid, timeout=args.timeout)
                            outcome = "correct" if np.array_equal(r["output"], x) else "wrong"
                        except tdask.TdaskError as e:
                            outcome = type(e).__name__
                        ledger.answered(rid, outcome)
                        return rid

                    async def load(seconds: float) -> list[str]:
                        rids: list[str] = []
                        end = time.monotonic() + seconds

                        async def loop_() -> None:
                            while time.monotonic() < end:
                                rids.append(await one(rng.integers(0, 1000, size=args.size)))

                        await asyncio.gather(*(loop_() for _ in range(args.concurrency)))
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
    finally:
        await cluster.close()
    total = ledger.summary()
    return {"phases": phases, "total": total, "settings": vars(args)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds-per-phase", type=float, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", type=int, default=1000, help="int64 elements per request")
    p.add_argument("--timeout", type=float, default=30, help="per-request timeout, seconds")
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
