"""``python -m tdask.client``: send load to a deployed operator (through Dask, or a front door over HTTP or gRPC)
and check every answer it knows how to check."""

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

from tdask import config
from tdask.cli.options import (
    add_scheduler_options,
    check_protocol,
    non_negative_float,
    parameter,
    positive_float,
    positive_int,
)
from tdask.compat import TimeoutErrors
from tdask.deploy.cluster import announced, announced_scheduler_address
from tdask.errors import TdaskError
from tdask.session import RemoteOperator, Session, connect


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tdask.client", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_scheduler_options(p)
    p.add_argument("--operator", default="encoder_decoder",
                   help="operator to call: any deployed one; its inputs are made from its metadata (datatypes, "
                        "shapes: each -1 takes the input size), answers of the hello world's are checked")
    p.add_argument("--protocol", choices=("dask", "http", "grpc"), default="dask",
                   help="call through a Dask client (dask) or a KServe v2 front door (http, grpc) with tritonclient")
    p.add_argument("--url", default=None,
                   help="the front door for --protocol http|grpc, host:port (default: the embedded deploy's "
                        "announced one, else 127.0.0.1:tdask.frontdoor.http-port|grpc-port)")
    p.add_argument("--inputs", default=None, metavar="FILE.npz",
                   help="send these arrays (one per input name) in every request instead of generated data")
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
    p.add_argument("--output-device", choices=("cpu", "gpu"), default=None,
                   help="have outputs come back as NumPy (cpu) or stay CuPy arrays on the GPU (gpu); "
                        "default: as the operator produced them")
    p.add_argument("--stream", action="store_true",
                   help="stream each request (several responses per request, e.g. encoder_decoder_stream): report "
                        "responses per request, time to first response and time between responses, and check the "
                        "concatenated answer")
    p.add_argument("--seed", type=int, default=0, help="random seed for input sizes and values")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON to FILE ('-': stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@dataclass
class ClientStats:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wrong: int = 0
    # --stream: responses per request, times to first response and between responses (seconds)
    responses: list[int] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    between: list[float] = field(default_factory=list)


HELLO_WORLD = ("encoder_decoder", "encoder", "decoder", "encoder_decoder_stream", "decoder_stream")


def expected_output(operator: str, x: np.ndarray, copies: int) -> np.ndarray | None:
    """What a correct answer is, for the hello-world operators; None when unknown."""
    if operator in ("encoder_decoder", "encoder_decoder_stream", "decoder_stream"):
        return x
    if operator == "encoder":
        return ~np.repeat(x, copies)
    if operator == "decoder":
        return x
    return None


def make_input(operator: str, x: np.ndarray, copies: int) -> np.ndarray:
    # the decoder alone is fed what the encoder would have produced
    return ~np.repeat(x, copies) if operator in ("decoder", "decoder_stream") else x


def generated(spec: dict[str, Any], size: int, rng: np.random.Generator) -> np.ndarray:
    """Data of a declared input: its datatype, its shape with each -1 (any size) taking ``size``."""
    from tdask.frontdoor.kserve import DTYPES

    dtype = DTYPES.get(spec["datatype"])
    if dtype is None:
        raise TdaskError(f"input {spec['name']!r}: the client cannot make {spec['datatype']} data (use --inputs)")
    shape = tuple(size if int(d) < 0 else int(d) for d in spec.get("shape", []))
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, 0), min(info.max, 2**31), size=shape, dtype=dtype, endpoint=False)
    return rng.random(shape).astype(dtype)


class Caller:
    """One way to call the operator: tdask's own session (dask) or a front door with tritonclient (http, grpc)."""

    metadata: dict[str, Any]

    async def call(self, inputs: dict[str, np.ndarray], params: dict[str, Any], request_id: str,
                   args: argparse.Namespace) -> tuple[dict[str, Any], str]:
        """The answer's outputs, and who answered."""
        raise NotImplementedError

    async def stream(self, inputs: dict[str, np.ndarray], params: dict[str, Any], request_id: str,
                     args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[float], str]:
        """Each response's outputs and when it came (``time.perf_counter()``), and who answered."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the connection."""


class DaskCaller(Caller):
    def __init__(self, session: Session, op: RemoteOperator) -> None:
        self.session, self.op = session, op
        self.metadata = op.record.get("metadata") or {}

    async def call(self, inputs, params, request_id, args):  # noqa: ANN001, ANN201 - as Caller.call
        result = await self.op.infer(inputs, params, request_id=request_id, timeout=args.timeout,
                                     output_device=args.output_device)
        outputs = {k: (v.get() if hasattr(v, "__cuda_array_interface__") else v)  # checked on the host
                   for k, v in result.outputs.items()}
        return outputs, f"{result.replica}@{result.worker}"

    async def stream(self, inputs, params, request_id, args):  # noqa: ANN001, ANN201 - as Caller.stream
        outputs, times, who = [], [], None
        async with self.op.stream(inputs, params, request_id=request_id, timeout=args.timeout,
                                  output_device=args.output_device) as responses:
            async for result in responses:
                times.append(time.perf_counter())
                outputs.append({k: (v.get() if hasattr(v, "__cuda_array_interface__") else v)
                                for k, v in result.outputs.items()})
                who = f"{result.replica}@{result.worker}"
        return outputs, times, who

    async def close(self) -> None:
        await self.session.close()


class FrontDoorCaller(Caller):
    """Stock ``tritonclient`` (asyncio) against a KServe v2 front door."""

    def __init__(self, protocol: str, url: str) -> None:
        if protocol == "http":
            import tritonclient.http.aio as module
        else:
            import tritonclient.grpc.aio as module
        self.module = module
        self.url = url
        self.client = module.InferenceServerClient(url)
        self.metadata: dict[str, Any] = {}
        self._http: Any = None  # aiohttp, for server-sent events

    async def describe(self, model: str, version: int | None) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            md = await self.client.get_model_metadata(model, str(version or ""), **(
                {"as_json": True} if self.module.__name__.endswith("grpc.aio") else {}))
        except InferenceServerException as e:
            raise TdaskError(f"front door {self.url}: {e.message()}") from None
        for specs in (md.get("inputs", []), md.get("outputs", [])):
            for spec in specs:
                spec["shape"] = [int(d) for d in spec.get("shape", [])]
        self.metadata = md

    async def call(self, inputs, params, request_id, args):  # noqa: ANN001, ANN201 - as Caller.call
        from tdask.frontdoor.kserve import datatype_of

        tensors = []
        for name, value in inputs.items():
            tensor = self.module.InferInput(name, list(value.shape), datatype_of(value.dtype))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        timeout = {"timeout": int(args.timeout * 1e6)} if args.timeout else {}  # Triton's, in microseconds
        answer = await self.client.infer(args.operator, tensors, model_version=str(args.operator_version or ""),
                                         request_id=request_id, parameters=params or None, **timeout)
        response = answer.get_response()  # a dict over HTTP, a protobuf message over gRPC
        outputs = response["outputs"] if isinstance(response, dict) else response.outputs
        names = [o["name"] if isinstance(o, dict) else o.name for o in outputs]
        return {n: answer.as_numpy(n) for n in names}, self.url

    async def stream(self, inputs, params, request_id, args):  # noqa: ANN001, ANN201 - as Caller.stream
        if self.module.__name__.endswith("http.aio"):
            return await self._sse(inputs, params, request_id, args)
        from tdask.frontdoor.kserve import datatype_of

        tensors = []
        for name, value in inputs.items():
            tensor = self.module.InferInput(name, list(value.shape), datatype_of(value.dtype))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)

        async def one_request():  # noqa: ANN202 - the stream's requests: this one
            yield {"model_name": args.operator, "model_version": str(args.operator_version or ""),
                   "inputs": tensors, "request_id": request_id, "parameters": params or None}

        outputs, times = [], []
        async for answer, error in self.client.stream_infer(one_request(), stream_timeout=args.timeout):
            if error is not None:
                raise TdaskError(f"front door {self.url}: {error.message()}")
            names = [o.name for o in answer.get_response().outputs]
            times.append(time.perf_counter())
            outputs.append({n: answer.as_numpy(n) for n in names})
        return outputs, times, self.url

    async def _sse(self, inputs, params, request_id, args):  # noqa: ANN001, ANN202 - as Caller.stream
        """Triton's generate extension: server-sent events from ``generate_stream``."""
        import aiohttp

        from tdask.frontdoor.kserve import DTYPES

        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout))
        version = f"/versions/{args.operator_version}" if args.operator_version else ""
        body = {name: value.tolist() for name, value in inputs.items()}
        body.update({"id": request_id, "parameters": params})
        outputs, times = [], []
        async with self._http.post(f"http://{self.url}/v2/models/{args.operator}{version}/generate_stream",
                                   json=body) as answer:
            if answer.status != 200:
                raise TdaskError(f"front door {self.url}: HTTP {answer.status}: {await answer.text()}")
            async for line in answer.content:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise TdaskError(f"front door {self.url}: {event['error']}")
                times.append(time.perf_counter())
                outputs.append({spec["name"]: np.asarray(event[spec["name"]], dtype=DTYPES[spec["datatype"]])
                                for spec in self.metadata.get("outputs", []) if spec["name"] in event})
        return outputs, times, self.url

    async def close(self) -> None:
        await self.client.close()
        if self._http is not None:
            await self._http.close()


_request_ids = itertools.count()


async def run_client(index: int, caller: Caller, args: argparse.Namespace, stats: ClientStats) -> None:
    """``--concurrency`` loops (all requests at once without it), each making its request's input just before
    sending it: a request's timeout and latency count that request only, and the inputs alive at once are
    bounded by the concurrency, not by the request count."""
    rng = np.random.default_rng(args.seed + index)
    params = dict(args.parameter)
    copies = int(params.get("input_copies", 1))
    declared = caller.metadata.get("inputs") or []
    hello_world = args.operator in HELLO_WORLD and [s.get("name") for s in declared] in ([], ["input"])
    fixed = dict(np.load(args.inputs)) if args.inputs else None
    bar = tqdm(total=args.requests_per_client, position=index, desc=f"Client {index}",
               disable=args.no_progress, leave=True, file=sys.stdout)
    todo = iter(range(args.requests_per_client))

    async def one() -> None:
        size = max(0, round(rng.normal(args.input_size_mean, args.input_size_stdev)))
        expected = None
        if fixed is not None:
            inputs = fixed
        elif hello_world or not declared:  # the hello world's int64 input (any operator that declares nothing)
            x = rng.integers(0, 2**31, size=size, dtype=np.int64)
            inputs = {"input": make_input(args.operator, x, copies)}
            expected = expected_output(args.operator, x, copies) if hello_world else None
        else:
            inputs = {spec["name"]: generated(spec, size, rng) for spec in declared}
        request_id = str(next(_request_ids))
        start = time.perf_counter()
        error: Any = None
        who = None
        try:
            if args.stream:
                responses, times, who = await caller.stream(inputs, params, request_id, args)
                stats.responses.append(len(responses))
                if times:
                    stats.first.append(times[0] - start)
                    stats.between.extend(np.diff(times).tolist())
                outputs = {name: np.concatenate([r[name] for r in responses])
                           for name in (responses[0] if responses else {})}
            else:
                outputs, who = await caller.call(inputs, params, request_id, args)
            if expected is not None and args.stream and not outputs:
                stats.wrong += 1
                error = "no response"
                stats.errors.append(error)
            elif expected is not None:
                output = outputs["output"]
                if not (output.shape == expected.shape and np.array_equal(output, expected)):
                    stats.wrong += 1
                    error = f"wrong output (shape {output.shape}, expected {expected.shape})"
                    stats.errors.append(error)
        except Exception as e:  # noqa: BLE001 - every request ends counted, whatever failed
            error = f"{type(e).__name__}: {e}"
            stats.errors.append(error)
        stats.latencies.append(time.perf_counter() - start)
        bar.set_description(f"Received Response: {request_id} From: {who} Error: {error}")
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
    streamed = [c for s in stats for c in s.responses]
    extra = {}
    if streamed:
        extra["stream"] = {
            "responses_per_request": float(np.mean(streamed)),
            "first_response_ms": _latency_summary([t for s in stats for t in s.first]),
            "between_responses_ms": _latency_summary([t for s in stats for t in s.between]),
        }
    return {
        **extra,
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


async def connect_caller(args: argparse.Namespace) -> Caller:
    """The caller ``--protocol`` names, with the operator's metadata; a clear error when it cannot be reached."""
    if args.protocol != "dask":
        port = config.get(f"frontdoor.{args.protocol}-port")
        url = args.url or announced(args.protocol) or f"127.0.0.1:{port}"
        caller = FrontDoorCaller(args.protocol, url.removeprefix("http://"))
        try:
            await caller.describe(args.operator, args.operator_version)
        except BaseException:
            await caller.close()
            raise
        return caller
    address = args.scheduler_address or announced_scheduler_address()
    problem = check_protocol(address.split("://")[0]) if "://" in address else None
    if problem:
        raise TdaskError(problem)
    try:
        session: Session = await connect(address, timeout=args.connect_timeout)
    except (*TimeoutErrors, OSError) as e:
        raise TdaskError(f"cannot reach the scheduler at {address} within {args.connect_timeout:g} s: {e}") from None
    try:
        return DaskCaller(session, await session.operator(args.operator, args.operator_version))
    except BaseException:
        await session.close()
        raise


async def amain(args: argparse.Namespace) -> int:
    try:
        caller = await connect_caller(args)
    except TdaskError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    try:
        stats = [ClientStats() for _ in range(args.clients)]
        start = time.perf_counter()
        await asyncio.gather(*(run_client(i, caller, args, stats[i]) for i in range(args.clients)))
        total = time.perf_counter() - start
    except TdaskError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    finally:
        await caller.close()
    summary = summarize(stats, total)
    for s in stats:
        for err in s.errors[:5]:
            print(f"Error: {err}")
    lat = summary["latency_ms"]
    print(summary_table(summary))
    if "stream" in summary:
        st = summary["stream"]
        first, between = st["first_response_ms"], st["between_responses_ms"]
        print(f"Responses per request: {st['responses_per_request']:.2f} "
              f"First response p50: {first['p50']:.2f} ms p99: {first['p99']:.2f} ms "
              f"Between responses p50: {between['p50']:.2f} ms p99: {between['p99']:.2f} ms")
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
