"""Shared pieces of the benchmarks: argument helpers, percentiles, tables, JSON and PNG output."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def int_list(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


@dataclass
class Measurement:
    """Requests completed by one system in one cell (possibly several interleaved rounds)."""

    system: str
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    errors: int = 0
    first_error: str | None = None
    rounds: list[tuple[float | None, float | None]] = field(default_factory=list)  # (req/s, p50 s) per add

    def add(self, latencies: list[float], elapsed: float, errors: int, first_error: str | None) -> None:
        self.latencies.extend(latencies)
        self.elapsed += elapsed
        self.errors += errors
        if self.first_error is None:
            self.first_error = first_error
        self.rounds.append((len(latencies) / elapsed if elapsed > 0 else None, percentile(latencies, 50)))

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        return {
            "system": self.system,
            "requests": n,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": round(self.elapsed, 4),
            "throughput": round(n / self.elapsed, 2) if self.elapsed > 0 else None,
            "p50_ms": _ms(percentile(self.latencies, 50)),
            "p99_ms": _ms(percentile(self.latencies, 99)),
            # per round, so that ratios can be medians of interleaved rounds rather than of pooled latencies
            "round_throughputs": [None if t is None else round(t, 2) for t, _ in self.rounds],
            "round_p50_ms": [_ms(p) for _, p in self.rounds],
        }


def median_of_rounds(a: dict[str, Any], b: dict[str, Any]) -> tuple[float | None, float | None]:
    """(a's throughput / b's, a's p50 - b's in ms), each the median over the rounds both ran (``summary()``'s
    ``round_*``): rounds are interleaved, so each round's pair saw the same conditions of a drifting host."""
    thr = [t / u for t, u in zip(a["round_throughputs"], b["round_throughputs"], strict=True) if t and u]
    p50 = [p - q for p, q in zip(a["round_p50_ms"], b["round_p50_ms"], strict=True) if p is not None and q is not None]
    return (round(statistics.median(thr), 3) if thr else None,
            round(statistics.median(p50), 3) if p50 else None)


class CpuBusy:
    """Share of all the machine's cores that were busy (not idle or waiting on I/O) between ``start`` and
    ``stop``, summed over several intervals: tells a run limited by routing from one limited by the cores."""

    def __init__(self) -> None:
        self.busy = 0.0
        self.total = 0.0
        self._t0: Any = None

    def start(self) -> None:
        import psutil

        self._t0 = psutil.cpu_times()

    def stop(self) -> None:
        import psutil

        t1 = psutil.cpu_times()
        deltas = {f: getattr(t1, f) - getattr(self._t0, f) for f in t1._fields}
        total = sum(deltas.values()) - deltas.get("guest", 0.0) - deltas.get("guest_nice", 0.0)
        self.total += total
        self.busy += total - deltas["idle"] - deltas.get("iowait", 0.0)

    @property
    def fraction(self) -> float | None:
        return round(self.busy / self.total, 3) if self.total > 0 else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def environment() -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def print_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str = "") -> str:
    """Print (and return) a Markdown table of ``rows`` with ``columns`` = [(key, header)]."""
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = []
    if title:
        lines.append(f"### {title}")
        lines.append("")
    lines.append("| " + " | ".join(h for _, h in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_default))
    os.replace(tmp, path)
    return path


def _default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


def plot(path: Path, results: dict[str, Any]) -> Path:
    """Throughput vs concurrency and p50/p99 latency per size, plus scaling, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results.get("cells", [])
    sizes = sorted({c["size"] for c in cells})
    scaling = results.get("scaling", [])
    ncols = len(sizes) + (1 if scaling else 0)
    fig, axes = plt.subplots(2, max(1, ncols), figsize=(5.2 * max(1, ncols), 8), squeeze=False)
    colors = {"direct": "tab:gray", "direct_sync": "black", "direct_shm": "tab:purple", "tdask_pipeline": "tab:blue",
              "tdask_chained": "tab:orange", "tdask_pipeline_deploy_layout": "tab:green"}
    for col, size in enumerate(sizes):
        mine = [c for c in cells if c["size"] == size]
        conc = sorted({c["concurrency"] for c in mine})
        ax_t, ax_l = axes[0][col], axes[1][col]
        for system, color in colors.items():
            if not any(system in c["systems"] for c in mine):
                continue
            thr, p50, p99 = [], [], []
            for c in conc:
                cell = next(x for x in mine if x["concurrency"] == c)
                s = cell["systems"].get(system, {})
                thr.append(s.get("throughput") or np.nan)
                p50.append(s.get("p50_ms") or np.nan)
                p99.append(s.get("p99_ms") or np.nan)
            ax_t.plot(conc, thr, "o-", color=color, label=system)
            ax_l.plot(conc, p50, "o-", color=color, label=f"{system} p50")
            ax_l.plot(conc, p99, "x--", color=color, label=f"{system} p99")
        for ax in (ax_t, ax_l):
            ax.set_xscale("log", base=2)
            ax.set_xticks(conc, [str(c) for c in conc])
            ax.set_xlabel("concurrency")
            ax.grid(alpha=0.3)
        ax_t.set_title(f"{size:,} int64 elements: throughput")
        ax_t.set_ylabel("pipelines / s")
        ax_l.set_title(f"{size:,} int64 elements: latency")
        ax_l.set_ylabel("ms")
        ax_l.set_yscale("log")
        ax_t.legend(fontsize=8)
        ax_l.legend(fontsize=7)
    if scaling:
        ax_t, ax_l = axes[0][-1], axes[1][-1]
        ns = [s["replicas"] for s in scaling]
        for system, color in (("direct", "tab:gray"), ("tdask_pipeline", "tab:blue")):
            ax_t.plot(ns, [s["systems"].get(system, {}).get("throughput") or np.nan for s in scaling], "o-",
                      color=color, label=system)
        base = scaling[0]["systems"].get("tdask_pipeline", {}).get("throughput") or np.nan
        ax_t.plot(ns, [base * n / ns[0] for n in ns], ":", color="black", label="ideal (N x one replica)")
        ax_t.set_title("scaling: replicas (instances) of encoder and decoder")
        ax_t.set_xlabel("replicas")
        ax_t.set_ylabel("pipelines / s")
        ax_t.legend(fontsize=8)
        ax_t.grid(alpha=0.3)
        ax_l.plot(ns, [s.get("efficiency") or np.nan for s in scaling], "o-", color="tab:blue",
                  label="tdask efficiency")
        ax_l.axhline(0.9, color="red", ls=":", label="target 0.9")
        ax_l.set_ylim(0, 1.2)
        ax_l.set_title("scaling efficiency: thr(N) / (N * thr(1))")
        ax_l.set_xlabel("replicas")
        ax_l.legend(fontsize=8)
        ax_l.grid(alpha=0.3)
    fig.suptitle(results.get("title", "tdask vs direct Triton"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


async def run_load(call: Callable[[Any], Awaitable[None]], x: np.ndarray, concurrency: int,
                   duration: float | None = None,
                   requests: int | None = None) -> tuple[list[float], float, int, str | None]:
    """``concurrency`` loops calling ``call(x)`` until ``duration`` passed or ``requests`` were sent."""
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    sent = 0
    start = time.perf_counter()
    deadline = start + duration if duration is not None else float("inf")

    async def loop() -> None:
        nonlocal errors, first_error, sent
        while time.perf_counter() < deadline and (requests is None or sent < requests):
            sent += 1
            t0 = time.perf_counter()
            try:
                await call(x)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors += 1
                if first_error is None:
                    first_error = f"{type(e).__name__}: {e}"[:500]
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start, errors, first_error


def check(x: np.ndarray, out: np.ndarray) -> None:
    if out.shape != x.shape or not np.array_equal(out, x):
        raise AssertionError(f"wrong output: shape {out.shape} vs {x.shape}")


class StockClient:
    """``tritonclient``'s asyncio client for one protocol, against one server: what a user of Triton writes
    (``direct``), or one call of tdask's pipeline through a front door (``pipeline``)."""

    def __init__(self, protocol: str, url: str) -> None:
        if protocol == "grpc":
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        self.module = module
        self.client = module.InferenceServerClient(url.removeprefix("http://"))

    def _input(self, x: np.ndarray) -> Any:
        tensor = self.module.InferInput("input", list(x.shape), "INT64")
        tensor.set_data_from_numpy(x)
        return tensor

    async def direct(self, x: np.ndarray) -> None:
        """Encoder, then decoder: what a user of Triton alone writes."""
        encoded = await self.client.infer("encoder", [self._input(x)])
        copies = int(encoded.as_numpy("input_copies").reshape(-1)[0])
        decoded = await self.client.infer("decoder", [self._input(encoded.as_numpy("output"))],
                                          parameters={"input_copies": copies})
        check(x, decoded.as_numpy("output"))

    async def pipeline(self, x: np.ndarray) -> None:
        """One call of tdask's encoder_decoder through the front door."""
        answer = await self.client.infer("encoder_decoder", [self._input(x)])
        check(x, answer.as_numpy("output"))

    async def close(self) -> None:
        await self.client.close()


def run_threads(call: Callable[[int, np.ndarray], None], x: np.ndarray, concurrency: int,
                duration: float | None = None,
                requests: int | None = None) -> tuple[list[float], float, int, str | None]:
    """:func:`run_load` for blocking clients: ``concurrency`` threads, thread ``slot`` looping ``call(slot, x)``
    (with that slot's own client) until ``duration`` passed or ``requests`` were sent. It blocks: the event loop
    runs it with ``asyncio.to_thread``, so the tdask processes this one hosts (the scheduler) keep running."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    first_errors: list[str] = []
    tickets = iter(range(requests)) if requests is not None else None  # next() is atomic under the GIL
    start = time.perf_counter()
    deadline = start + duration if duration is not None else float("inf")

    def loop(slot: int) -> None:
        mine = latencies[slot]
        while time.perf_counter() < deadline and (tickets is None or next(tickets, None) is not None):
            t0 = time.perf_counter()
            try:
                call(slot, x)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors[slot] += 1
                if not first_errors:
                    first_errors.append(f"{type(e).__name__}: {e}"[:500])
                continue
            mine.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(slot,), name=f"direct-slot-{slot}", daemon=True)
               for slot in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ([t for mine in latencies for t in mine], time.perf_counter() - start, sum(errors),
            first_errors[0] if first_errors else None)


class SyncDirect:
    """The form of Triton's own examples: ``tritonclient.grpc``'s blocking client, one per thread (a slot of
    :func:`run_threads`), encoder then decoder with the returned ``input_copies``; tensors travel in the gRPC
    messages. Without an event loop between the caller and grpcio, it is a stronger yardstick than the asyncio
    client of :class:`StockClient`. Slots are set up once by :meth:`prepare` and kept for later cells."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as module

        self.module = module
        self.url = url.removeprefix("http://")
        self.clients: list[Any] = []

    def prepare(self, x: np.ndarray, concurrency: int) -> None:
        """Slots ``0..concurrency-1`` ready for requests like ``x``; each new one calls once, so that neither its
        connection nor its first-call costs are measured (a failure there is left to the measured calls). Blocks."""
        fresh = [slot for slot in range(concurrency) if not self._ready(slot, x)]
        for slot in fresh:
            self._setup(slot, x)
        for slot in fresh:
            with contextlib.suppress(Exception):
                self.call(slot, x)

    def _ready(self, slot: int, x: np.ndarray) -> bool:
        return slot < len(self.clients)

    def _setup(self, slot: int, x: np.ndarray) -> None:
        while len(self.clients) <= slot:
            self.clients.append(self.module.InferenceServerClient(self.url))

    def _input(self, x: np.ndarray) -> Any:
        tensor = self.module.InferInput("input", list(x.shape), "INT64")
        tensor.set_data_from_numpy(x)
        return tensor

    def call(self, slot: int, x: np.ndarray) -> None:
        client = self.clients[slot]
        encoded = client.infer("encoder", [self._input(x)])
        copies = int(encoded.as_numpy("input_copies").reshape(-1)[0])
        decoded = client.infer("decoder", [self._input(encoded.as_numpy("output"))],
                               parameters={"input_copies": copies})
        check(x, decoded.as_numpy("output"))

    def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                client.close()
        self.clients.clear()


@dataclass
class Region:
    """A system shared-memory region of this process, and whether Triton has it registered."""

    name: str
    handle: Any
    nbytes: int
    registered: bool = False


class ShmDirect(SyncDirect):
    """:class:`SyncDirect` with every tensor in Triton's system shared memory (its ``shm`` examples): per slot, the
    request's input, the encoder's ``output`` and ``input_copies`` and the decoder's ``output`` each have a region
    registered with the server, and the encoder's output region is the decoder's input in place: no tensor byte
    travels in a gRPC message. The input is written into its region per request (a caller's data has to get
    there) and the answer is checked where it lies. The regions are sized for the encoder's default
    ``input_copies`` of 1 (a larger one overflows them: an error of the request). Region names carry this
    process's id and the slot; :meth:`close` unregisters and unlinks every one, also after a failed setup."""

    TENSORS = ("input", "encoded", "copies", "decoded")

    def __init__(self, url: str) -> None:
        super().__init__(url)
        from tritonclient.utils import shared_memory

        self.shm = shared_memory
        self.size: int | None = None
        self.regions: dict[int, dict[str, Region]] = {}
        self.cleanup_errors: list[str] = []

    def prepare(self, x: np.ndarray, concurrency: int) -> None:
        if x.size != self.size:  # new regions for a new size; the old ones go first (8 MB x 3 x slots)
            self._release()
            self.size = x.size
        super().prepare(x, concurrency)

    def _ready(self, slot: int, x: np.ndarray) -> bool:
        return super()._ready(slot, x) and len(self.regions.get(slot, {})) == len(self.TENSORS)

    def _setup(self, slot: int, x: np.ndarray) -> None:
        super()._setup(slot, x)
        regions = self.regions.setdefault(slot, {})  # recorded as soon as made: _release finds them all
        for tensor in self.TENSORS:
            if tensor in regions:
                continue
            name = f"tdask-bench-{os.getpid()}-{x.size}-{slot}-{tensor}"
            nbytes = 8 if tensor == "copies" else x.nbytes
            region = regions[tensor] = Region(name, self.shm.create_shared_memory_region(
                name, "/" + name, nbytes, create_only=True), nbytes)
            self.clients[slot].register_system_shared_memory(name, "/" + name, nbytes)
            region.registered = True

    def _output(self, name: str, region: Region) -> Any:
        out = self.module.InferRequestedOutput(name)
        out.set_shared_memory(region.name, region.nbytes)
        return out

    def call(self, slot: int, x: np.ndarray) -> None:
        client, r, m = self.clients[slot], self.regions[slot], self.module
        self.shm.set_shared_memory_region(r["input"].handle, [x])
        tensor = m.InferInput("input", list(x.shape), "INT64")
        tensor.set_shared_memory(r["input"].name, x.nbytes)
        encoded = client.infer("encoder", [tensor], outputs=[self._output("output", r["encoded"]),
                                                              self._output("input_copies", r["copies"])])
        copies = int(self.shm.get_contents_as_numpy(r["copies"].handle, np.int64, [1])[0])
        shape = list(encoded.get_output("output").shape)
        tensor = m.InferInput("input", shape, "INT64")
        tensor.set_shared_memory(r["encoded"].name, 8 * int(np.prod(shape)))
        decoded = client.infer("decoder", [tensor], outputs=[self._output("output", r["decoded"])],
                               parameters={"input_copies": copies})
        check(x, self.shm.get_contents_as_numpy(r["decoded"].handle, np.int64,
                                                list(decoded.get_output("output").shape)))

    def _release(self) -> None:
        """Unregister (from the server) and unlink every region; what fails is kept in ``cleanup_errors``."""
        for slot, regions in self.regions.items():
            for region in regions.values():
                try:
                    if region.registered:
                        self.clients[slot].unregister_system_shared_memory(region.name)
                except Exception as e:  # noqa: BLE001 - reported; the region is unlinked all the same
                    self.cleanup_errors.append(f"unregister {region.name}: {type(e).__name__}: {e}"[:300])
                try:
                    self.shm.destroy_shared_memory_region(region.handle)
                except Exception as e:  # noqa: BLE001 - reported
                    self.cleanup_errors.append(f"destroy {region.name}: {type(e).__name__}: {e}"[:300])
        self.regions.clear()
        self.size = None

    def close(self) -> None:
        try:
            self._release()
        finally:
            super().close()

