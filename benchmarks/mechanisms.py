"""What each of tdask's heavy mechanisms buys: the pipeline with it on and with it off, side by side.

``python -m benchmarks.mechanisms`` deploys the hello-world pipeline once with every mechanism on (the
baseline) and once per mechanism with only that one turned off through its setting. It runs both
layouts: one worker, and deploy's placement (a worker per operator). Each configuration runs in a
process of its own, with its own embedded cluster and session, so a setting that a process reads once
cannot leak from one side to the other. Cells are measured interleaved (baseline, then the mechanism
off, ``--rounds`` times). A cell's *gain* is the baseline's throughput over the mechanism-off
throughput (above 1: the mechanism helps), and its p50 difference (below 0: the mechanism helps).

Results go to ``benchmarks/results/mechanisms.json``; ``docs/design.md`` records them per target cell.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, CpuBusy, Measurement, environment, int_list, print_table, ratio, write_json

SMALL, LARGE = 1000, 1_000_000

# mechanism -> (the settings that turn it off, the element counts it can matter for, the layouts)
MECHANISMS: dict[str, tuple[dict[str, Any], list[int], list[int]]] = {
    "socket": ({"tdask.transfer.request-stream": "dask"}, [SMALL, LARGE], [1, 3]),
    "lending": ({"tdask.transfer.shared-memory-frames": False}, [LARGE], [1, 3]),
    "frame-pool": ({"tdask.transfer.shared-memory-frames-bytes": 0}, [LARGE], [1, 3]),
    "mapping": ({"tdask.transfer.mapped-frames-bytes": 0}, [LARGE], [1, 3]),
    "peer-regions": ({"tdask.triton.peer-regions-bytes": 0}, [LARGE], [1, 3]),
    "lanes": ({"tdask.lanes.enabled": False}, [SMALL], [3]),
}
LAYOUTS = {1: "one worker", 3: "deploy's placement"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mechanisms", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mechanisms", default=",".join(MECHANISMS),
                   help=f"comma-separated, of: {', '.join(MECHANISMS)}")
    p.add_argument("--layouts", type=int_list, default=[1, 3], help="worker counts: 1 and/or 3")
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=2.0, help="seconds per system per round and cell")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell")
    p.add_argument("--against", metavar="DIR", default=None,
                   help="instead of mechanisms: this checkout (on) against the tdask checkout in DIR (off), with the "
                        "same settings, every size; DIR needs this benchmarks/ folder (copy it there)")
    p.add_argument("--smoke", action="store_true", help="seconds-long run of the harness (numbers meaningless)")
    p.add_argument("--output", default=None, help="JSON result file (default benchmarks/results/mechanisms.json)")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # internal: one configuration's process
    return p


# -- one configuration's process ------------------------------------------------------------------
async def serve(spec: dict[str, Any]) -> None:
    """Deploy the pipeline with ``spec["settings"]`` on ``spec["workers"]`` workers, then answer load commands
    read as JSON lines on stdin with one JSON line each on stdout."""
    import dask.config

    from benchmarks.common import run_load
    from benchmarks.pipeline import deployed, embedded_client, tdask_configs

    dask.config.set({"distributed.worker.daemon": False, **spec["settings"]})
    async with embedded_client(spec["workers"]) as client, deployed(client, tdask_configs(2, 16, 256)) as td:
        seen = await client.run(_settings, sorted(spec["check"]))  # what the workers run with
        _answer({"ready": True, "seen": seen})
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or json.loads(line).get("exit"):
                break
            cmd = json.loads(line)
            x = np.arange(cmd["size"], dtype=np.int64)
            latencies, elapsed, errors, first = await run_load(
                td.call_pipeline, x, cmd["concurrency"], duration=cmd.get("duration"), requests=cmd.get("requests"))
            _answer({"latencies": latencies, "elapsed": elapsed, "errors": errors, "first_error": first})


def _settings(keys: list[str]) -> dict[str, Any]:
    import dask.config

    return {key: dask.config.get(key, None) for key in keys}


def _answer(msg: dict[str, Any]) -> None:
    sys.__stdout__.write(json.dumps(msg) + "\n")
    sys.__stdout__.flush()


class System:
    """A configuration's process, driven over its stdin and stdout."""

    def __init__(self, name: str, workers: int, settings: dict[str, Any], check: list[str],
                 tree: Path = Path(__file__).resolve().parent.parent) -> None:
        self.name = name
        self.seen: dict[str, Any] = {}
        spec = json.dumps({"workers": workers, "settings": settings, "check": check})
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.mechanisms", "--serve", spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree)

    def _ask(self, msg: dict[str, Any] | None = None) -> dict[str, Any]:
        if msg is not None:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: its process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def ready(self) -> None:
        self.seen = self._ask()["seen"]

    def load(self, size: int, concurrency: int, duration: float | None = None,
             requests: int | None = None) -> dict[str, Any]:
        return self._ask({"size": size, "concurrency": concurrency, "duration": duration, "requests": requests})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.write(json.dumps({"exit": True}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(baseline: System, off: System, sizes: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    cells = []
    for size in sizes:
        for system in (baseline, off):
            system.load(size, 1, requests=3)  # warm-up: connections, first-call costs
        for conc in args.concurrency:
            ms = {s.name: Measurement(s.name) for s in (baseline, off)}
            cpu = {s.name: CpuBusy() for s in (baseline, off)}
            per_round = []
            for _ in range(args.rounds):
                got = {}
                for system in (baseline, off):
                    cpu[system.name].start()
                    r = system.load(size, conc, duration=args.duration)
                    cpu[system.name].stop()
                    ms[system.name].add(r["latencies"], r["elapsed"], r["errors"], r["first_error"])
                    got[system.name] = len(r["latencies"]) / r["elapsed"] if r["elapsed"] else None
                per_round.append(ratio(got[baseline.name], got[off.name]))
            on_s, off_s = ms[baseline.name].summary(), ms[off.name].summary()
            cell = {"size": size, "concurrency": conc, "on": on_s, "off": off_s,
                    "cpu_busy": {"on": cpu[baseline.name].fraction, "off": cpu[off.name].fraction},
                    "gain": ratio(on_s["throughput"], off_s["throughput"]),
                    "gain_per_round": per_round,
                    "p50_diff_ms": (round(on_s["p50_ms"] - off_s["p50_ms"], 3)
                                    if on_s["p50_ms"] is not None and off_s["p50_ms"] is not None else None)}
            cells.append(cell)
            print(f"  {size} x {conc}: on {on_s['throughput']}/s p50 {on_s['p50_ms']} ms, off {off_s['throughput']}/s "
                  f"p50 {off_s['p50_ms']} ms: gain {cell['gain']} (rounds {per_round}), p50 {cell['p50_diff_ms']} ms; "
                  f"errors {on_s['errors']}/{off_s['errors']}", flush=True)
    return cells


def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
    unknown = set(wanted) - set(MECHANISMS)
    if unknown:
        raise SystemExit(f"unknown mechanisms: {sorted(unknown)} (known: {', '.join(MECHANISMS)})")
    started = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(), "settings": {
        "concurrency": args.concurrency, "duration_s": args.duration, "rounds": args.rounds,
        "instances": 2, "max_inflight": 16, "pipeline_max_inflight": 256, "against": args.against}, "rows": []}
    if args.against is not None:
        for workers in args.layouts:
            print(f"{LAYOUTS.get(workers, workers)}: this checkout against {args.against}", flush=True)
            here, there = System("this", workers, {}, []), System(args.against, workers, {}, [], Path(args.against))
            try:
                here.ready()
                there.ready()
                results["rows"].append({"mechanism": f"against {args.against}", "workers": workers,
                                        "off_settings": {}, "cells": measure(here, there, [SMALL, LARGE], args)})
            finally:
                here.close()
                there.close()
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        return results
    for workers in args.layouts:
        todo = [m for m in wanted if workers in MECHANISMS[m][2]]
        if not todo:
            continue
        print(f"{LAYOUTS.get(workers, workers)}: baseline", flush=True)
        check = sorted({key for name in todo for key in MECHANISMS[name][0]})
        baseline = System("on", workers, {}, check)
        try:
            baseline.ready()
            for name in todo:
                settings, sizes, _ = MECHANISMS[name]
                if args.smoke:
                    sizes = [min(s, 200_000) for s in sizes]
                print(f"{LAYOUTS.get(workers, workers)}: {name} off ({settings})", flush=True)
                off = System(f"{name} off", workers, settings, check)
                try:
                    off.ready()
                    cells = measure(baseline, off, sizes, args)
                finally:
                    off.close()
                # the settings each side's workers ran with: the switch is proven to have reached them
                results["rows"].append({"mechanism": name, "workers": workers, "off_settings": settings,
                                        "workers_saw": {"on": baseline.seen, "off": off.seen}, "cells": cells})
        finally:
            baseline.close()
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    return results


def report(results: dict[str, Any]) -> str:
    rows = []
    for row in results["rows"]:
        for cell in row["cells"]:
            rounds = [r for r in cell["gain_per_round"] if r is not None]
            rows.append({"mechanism": row["mechanism"], "layout": LAYOUTS.get(row["workers"], row["workers"]),
                         "size": cell["size"], "conc": cell["concurrency"],
                         "on": cell["on"]["throughput"], "off": cell["off"]["throughput"], "gain": cell["gain"],
                         "spread": f"{min(rounds):.2f}-{max(rounds):.2f}" if rounds else None,
                         "p50_on": cell["on"]["p50_ms"], "p50_off": cell["off"]["p50_ms"],
                         "p50_diff": cell["p50_diff_ms"],
                         "cpu": f"{cell['cpu_busy']['on']}/{cell['cpu_busy']['off']}"})
    return print_table(rows, [
        ("mechanism", "mechanism"), ("layout", "layout"), ("size", "elements"), ("conc", "concurrency"),
        ("on", "req/s on"), ("off", "req/s off"), ("gain", "gain (on/off)"), ("spread", "gain per round"),
        ("p50_on", "p50 on ms"), ("p50_off", "p50 off ms"), ("p50_diff", "p50 on - off ms"),
        ("cpu", "CPU busy on/off")], "What each mechanism buys (baseline: all on; off: only that one off)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("distributed", "tdask"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.serve is not None:
        sys.stdout = sys.stderr  # stdout carries the answers only
        asyncio.run(serve(json.loads(args.serve)))
        return 0
    if args.smoke:
        args.duration, args.rounds, args.concurrency = 0.25, 1, [1]
    results = run(args)
    results["table_markdown"] = report(results)
    out = Path(args.output or RESULTS / ("mechanisms-smoke.json" if args.smoke else "mechanisms.json"))
    write_json(out, results)
    print(f"wrote {out}; total {results['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
