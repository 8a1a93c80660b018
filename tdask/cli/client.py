"""``python -m tdask.client``: send load to a deployed operator and check every answer."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from tdask.cli.options import check_protocol, non_negative_float, parameter, positive_float, positive_int
from tdask.compat import TimeoutErrors
from tdask.deploy.cluster import announced_scheduler_address
from tdask.errors import TdaskError
from tdask.session import RemoteOperator, Session, connect


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tdask.client", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scheduler-address", default=None,
                   help="scheduler to use (default: the embedded deploy's announced address, else "
                        "tcp://127.0.0.1:8786)")
    p.add_argument("--operator", default="encoder_decoder", help="operator to call (encoder_decoder, encoder, decoder)")
    p.add_argument("--operator-version", type=positive_int, default=None, help="operator version (default: latest)")
    p.add_argument("--clients", type=positive_int, default=1, help="concurrent clients")
    p.add_argument("--requests-per-client", type=positive_int, default=100, help="requests each client sends")
    p.add_argument("--input-size-mean", type=non_negative_float, default=1000,
                   help="mean number of int64 elements per request")
    p.add_argument("--input-size-stdev", type=non_negative_float, default=0,
                   help="standard deviation of the input size")
    p.add_argument("--concurrency", type=positive_int, default=None,
                   help="requests one client keeps in flight (default: all of them at once, like the original); "
                        "each input is made just before its request is sent")
    p.add_argument("--parameter", type=parameter, action="append", default=[], metavar="KEY=VALUE",
                   help="request parameter, e.g. input_copies=2 or delay=0.001 (repeatable)")
    p.add_argument("--timeout", type=positive_float, default=None,
                   help="per-request timeout in seconds (default: tdask.request.timeout)")
    p.add_argument("--connect-timeout", type=positive_float, default=5.0,
                   help="seconds to reach the scheduler before giving up")
    p.add_argument("--output-device", choices=("cpu", "gpu"), default=None,
                   help="have outputs come back as NumPy (cpu) or stay CuPy arrays on the GPU (gpu); "
                        "default: as the operator produced them")
    p.add_argument("--seed", type=int, default=0, help="random seed for input sizes and values")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON to FILE ('-': stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@dataclass
class ClientStats:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wrong: int = 0


def expected_output(operator: str, x: np.ndarray, copies: int) -> np.ndarray | None:
    """What a correct answer is, for the hello-world operators; None when unknown."""
    if operator == "encoder_decoder":
        return x
    if operator == "encoder":
        return ~np.repeat(x, copies)
    if operator == "decoder":
        return x
    return None


def make_input(operator: str, x: np.ndarray, copies: int) -> np.ndarray:
    # the decoder alone is fed what the encoder would have produced
    return ~np.repeat(x, copies) if operator == "decoder" else x


_request_ids = itertools.count()


async def run_client(index: int, op: RemoteOperator, args: argparse.Namespace, stats: ClientStats) -> None:
    """``--concurrency`` loops (all requests at once without it), each making its request's input just before
    sending it: a request's timeout and latency count that request only, and the inputs alive at once are
    bounded by the concurrency, not by the request count."""
    rng = np.random.default_rng(args.seed + index)
    params = dict(args.parameter)
    copies = int(params.get("input_copies", 1))
    bar = tqdm(total=args.requests_per_client, position=index, desc=f"Client {index}",
               disable=args.no_progress, leave=True, file=sys.stdout)
    todo = iter(range(args.requests_per_client))

    async def one() -> None:
        size = max(0, round(rng.normal(args.input_size_mean, args.input_size_stdev)))
        x = rng.integers(0, 2**31, size=size, dtype=np.int64)
        request_id = str(next(_request_ids))
        start = time.perf_counter()
        error: Any = None
        replica = None
        try:
            result = await op.infer({"input": make_input(args.operator, x, copies)}, params,
                                    request_id=request_id, timeout=args.timeout, output_device=args.output_device)
            replica = f"{result.replica}@{result.worker}"
            expected = expected_output(args.operator, x, copies)
            output = result["output"]
            if hasattr(output, "__cuda_array_interface__"):  # checked on the host
                output = output.get()
            if expected is not None and not (output.shape == expected.shape and np.array_equal(output, expected)):
                stats.wrong += 1
                error = f"wrong output (shape {output.shape}, expected {expected.shape})"
                stats.errors.append(error)
        except Exception as e:  # noqa: BLE001 - every request ends counted, whatever failed
            error = f"{type(e).__name__}: {e}"
            stats.errors.append(error)
        stats.latencies.append(time.perf_counter() - start)
        bar.set_description(f"Received Response: {request_id} From: {replica} Error: {error}")
        bar.update(1)

    async def sender() -> None:
        for _ in todo:  # shared by the senders: each request is sent once
            await one()

    await asyncio.gather(*(sender() for _ in range(min(args.concurrency or args.requests_per_client,
                                                       args.requests_per_client))))
    bar.close()


def _latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s, dtype=float) * 1e3
    if not len(ms):
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def summarize(stats: Sequence[ClientStats], total_time: float) -> dict[str, Any]:
    n = sum(len(s.latencies) for s in stats)
    errors = sum(len(s.errors) for s in stats)
    return {
        "requests": n,
        "errors": errors,
        "wrong": sum(s.wrong for s in stats),
        "throughput": n / total_time if total_time > 0 else 0.0,
        "total_time": total_time,
        "latency_ms": _latency_summary([lat for s in stats for lat in s.latencies]),
        "clients": [
            {"client": i, "requests": len(s.latencies), "errors": len(s.errors), "wrong": s.wrong,
             "throughput": len(s.latencies) / total_time if total_time > 0 else 0.0,
             "latency_ms": _latency_summary(s.latencies)}
            for i, s in enumerate(stats)
        ],
    }


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: one row per client (when more than one) and the total."""
    header = ("Client", "Requests", "Errors", "Throughput (req/s)", "p50 ms", "p90 ms", "p99 ms")

    def row(name: str, s: dict[str, Any]) -> tuple[str, ...]:
        lat = s["latency_ms"]
        return (name, str(s["requests"]), str(s["errors"]), f"{s['throughput']:.2f}",
                f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}")

    rows = [row(str(c["client"]), c) for c in summary["clients"]] if len(summary["clients"]) > 1 else []
    rows.append(row("all", summary))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    rule = "-+-".join("-" * w for w in widths)
    fmt = lambda r: " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    lines = [fmt(header), rule, *(fmt(r) for r in rows[:-1])]
    if len(rows) > 1:
        lines.append(rule)
    lines.append(fmt(rows[-1]))
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> int:
    address = args.scheduler_address or announced_scheduler_address()
    problem = check_protocol(address.split("://")[0]) if "://" in address else None
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        return 2
    try:
        session: Session = await connect(address, timeout=args.connect_timeout)
    except (*TimeoutErrors, OSError) as e:
        print(f"Error: cannot reach the scheduler at {address} within {args.connect_timeout:g} s: {e}",
              file=sys.stderr)
        return 2
    try:
        op = await session.operator(args.operator, args.operator_version)
        stats = [ClientStats() for _ in range(args.clients)]
        start = time.perf_counter()
        await asyncio.gather(*(run_client(i, op, args, stats[i]) for i in range(args.clients)))
        total = time.perf_counter() - start
    except TdaskError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    finally:
        await session.close()
    summary = summarize(stats, total)
    for s in stats:
        for err in s.errors[:5]:
            print(f"Error: {err}")
    lat = summary["latency_ms"]
    print(summary_table(summary))
    print(f"Requests: {summary['requests']} Errors: {summary['errors']} "
          f"Latency p50: {lat['p50']:.2f} ms p90: {lat['p90']:.2f} ms p99: {lat['p99']:.2f} ms")
    if args.json:
        text = json.dumps(summary, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    print(f"Throughput: {summary['throughput']:.2f} Total Time: {summary['total_time']:.3f}")
    return 1 if summary["errors"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    copies = dict(args.parameter).get("input_copies", 1)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:  # the answers are checked with it
        parser.error(f"--parameter input_copies must be a positive integer, got {copies!r}")
    code = asyncio.run(amain(args))
    print(f"Clients Stopped Exit Code {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
