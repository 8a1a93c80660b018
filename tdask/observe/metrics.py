"""Operator metrics: aggregation of replica counters, and the Prometheus collector.

Workers answer ``tdask_stats`` with one snapshot per replica (see
:meth:`tdask.worker.stats.ReplicaStats.snapshot`). The functions here turn those snapshots
into rows per replica and per operator (requests/s, p50/p99 over a recent window);
they are pure, so the dashboard, ``/metrics`` and the tests share them.

:class:`TdaskCollector` exposes the latest snapshots on the scheduler's ``/metrics``
(Dask serves the global ``prometheus_client`` registry there):

- ``tdask_requests_total{operator,version,replica,worker,outcome}`` (completed, failed, rejected)
- ``tdask_request_latency_seconds`` histogram (per replica; cumulative since the replica started)
- streamed requests: ``tdask_stream_responses_total``, ``tdask_cancelled_requests_total`` and the
  ``tdask_first_response_seconds`` histogram (time to first response)
- ``tdask_inflight_requests`` and ``tdask_queued_requests`` gauges
- ``tdask_replica_info`` (device, model instances, max in-flight, state)
- ``tdask_triton_server_info{worker,pid,grpc_url,metrics_url}`` and ``tdask_triton_server_up``:
  where each Triton server's own Prometheus metrics are
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from tdask import config

DEFAULT_WINDOW = 10.0  # seconds over which requests/s and percentiles are computed
OUTCOMES = ("completed", "failed", "rejected")


# -- aggregation (pure) --------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def window_samples(latencies: Iterable[tuple[float, float]], now: float, window: float) -> tuple[list[float], float]:
    """Latencies that finished in ``(now - window, now]`` and the span they cover (for rates).

    When the sample log is full and its oldest sample is newer than the window start,
    the window is cut to the span the samples really cover, so the rate stays right.
    """
    samples = list(latencies)
    start = now - window
    recent = [lat for t, lat in samples if start < t <= now]
    span = window
    full = len(samples) >= int(config.get("replica.latency-samples"))  # the log dropped older samples
    if samples and len(recent) == len(samples) and samples[0][0] > start and full:
        span = max(now - samples[0][0], 1e-9)
    return recent, span


def replica_row(snapshot: Mapping[str, Any], now: float, window: float = DEFAULT_WINDOW) -> dict[str, Any]:
    """One replica's table row: identity, gauges, counters, requests/s and p50/p99 (ms)."""
    recent, span = window_samples(snapshot.get("latencies") or (), now, window)
    return {
        "operator": snapshot.get("name", "?"),
        "version": snapshot.get("version", ""),
        "replica": snapshot.get("replica", "?"),
        "worker": snapshot.get("worker", "?"),
        "device": snapshot.get("device", "?"),
        "instances": snapshot.get("instances", 1),
        "max_inflight": snapshot.get("max_inflight", 1),
        "state": snapshot.get("state", "?"),
        "inflight": int(snapshot.get("inflight", 0)),
        "queued": int(snapshot.get("queued", 0)),
        "completed": int(snapshot.get("completed", 0)),
        "failed": int(snapshot.get("failed", 0)),
        "rejected": int(snapshot.get("rejected", 0)),
        "rps": len(recent) / span if span > 0 else 0.0,
        "p50_ms": percentile(recent, 50) * 1e3,
        "p99_ms": percentile(recent, 99) * 1e3,
        "responses": int(snapshot.get("responses", 0)),
        "cancelled": int(snapshot.get("cancelled", 0)),
        "first_p50_ms": percentile(window_samples(snapshot.get("first_responses") or (), now, window)[0], 50) * 1e3,
    }


def aggregate(
    snapshots: Mapping[str, Mapping[str, Any]], now: float | None = None, window: float = DEFAULT_WINDOW
) -> dict[str, list[dict[str, Any]]]:
    """Rows per replica and per operator from ``{replica_id: snapshot}``.

    Operator rows sum the replicas' counters, gauges and rates; their percentiles come
    from all the replicas' samples together (not an average of percentiles).
    """
    now = time.time() if now is None else now
    replicas = sorted((replica_row(s, now, window) for s in snapshots.values()),
                      key=lambda r: (r["operator"], str(r["version"]), r["worker"], r["replica"]))
    operators: dict[tuple[str, Any], dict[str, Any]] = {}
    samples: dict[tuple[str, Any], list[float]] = {}
    firsts: dict[tuple[str, Any], list[float]] = {}  # times to first response of streamed requests
    for snap in snapshots.values():
        key = (snap.get("name", "?"), snap.get("version", ""))
        row = operators.setdefault(key, {
            "operator": key[0], "version": key[1], "replicas": 0, "devices": set(), "instances": 0,
            "inflight": 0, "queued": 0, "completed": 0, "failed": 0, "rejected": 0, "rps": 0.0,
            "responses": 0, "cancelled": 0,
        })
        r = replica_row(snap, now, window)
        row["replicas"] += 1
        row["devices"].add(r["device"])
        row["instances"] += int(r["instances"] or 0)
        for field in ("inflight", "queued", "completed", "failed", "rejected", "rps", "responses", "cancelled"):
            row[field] += r[field]
        samples.setdefault(key, []).extend(window_samples(snap.get("latencies") or (), now, window)[0])
        firsts.setdefault(key, []).extend(window_samples(snap.get("first_responses") or (), now, window)[0])
    ops = []
    for key, row in sorted(operators.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        row["devices"] = ",".join(sorted(row["devices"]))
        row["p50_ms"] = percentile(samples[key], 50) * 1e3
        row["p99_ms"] = percentile(samples[key], 99) * 1e3
        row["first_p50_ms"] = percentile(firsts[key], 50) * 1e3
        ops.append(row)
    return {"replicas": replicas, "operators": ops}


def merge_worker_stats(per_worker: Mapping[str, Mapping[str, Any] | None]) -> tuple[dict[str, Any], list[dict]]:
    """Flatten ``{worker: tdask_stats answer}`` into ``({replica_id: snapshot}, [triton server])``."""
    replicas: dict[str, Any] = {}
    triton: list[dict[str, Any]] = []
    for worker, answer in per_worker.items():
        if not isinstance(answer, Mapping):
            continue
        for rid, snap in (answer.get("replicas") or {}).items():
            replicas[rid] = {"worker": worker, **snap}
        for server in answer.get("triton") or ():
            triton.append({"worker": worker, **server})
    return replicas, triton


def cumulative_buckets(histogram: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Prometheus ``(le, cumulative count)`` pairs from a :meth:`LatencyLog.histogram`."""
    out = []
    running = 0
    counts = list(histogram.get("counts") or ())
    bounds = list(histogram.get("bounds") or ())
    for i, bound in enumerate(bounds):
        running += counts[i] if i < len(counts) else 0
        out.append((_le(bound), running))
    running += sum(counts[len(bounds):])
    out.append(("+Inf", running))
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


# -- Prometheus ----------------------------------------------------------------------


class TdaskCollector:
    """A ``prometheus_client`` collector over every live :class:`StatsSource` in this process.

    Collection only reads the sources' latest snapshots: it never waits on workers.
    """

    def __init__(self) -> None:
        self._sources: list[Callable[[], tuple[Mapping[str, Any], list[dict]]]] = []
        self._lock = threading.Lock()

    def add_source(self, source: Callable[[], tuple[Mapping[str, Any], list[dict]]]) -> None:
        with self._lock:
            if source not in self._sources:
                self._sources.append(source)

    def sources(self) -> list[Callable[[], tuple[Mapping[str, Any], list[dict]]]]:
        with self._lock:
            return list(self._sources)

    def remove_source(self, source: Callable[[], tuple[Mapping[str, Any], list[dict]]]) -> None:
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)

    def describe(self) -> list:
        return []  # metrics are collected only on demand (unchecked collector)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            sources = list(self._sources)
        replicas: dict[str, Any] = {}
        triton: list[dict[str, Any]] = []
        for source in sources:
            r, t = source()
            replicas.update(r)
            triton.extend(t)

        labels = ["operator", "version", "replica", "worker"]
        requests = CounterMetricFamily("tdask_requests", "Requests a replica finished, by outcome",
                                       labels=[*labels, "outcome"])
        latency = HistogramMetricFamily("tdask_request_latency_seconds",
                                        "Time from a request's arrival at a replica to its answer", labels=labels)
        inflight = GaugeMetricFamily("tdask_inflight_requests", "Requests a replica is executing", labels=labels)
        queued = GaugeMetricFamily("tdask_queued_requests", "Requests waiting in a replica's queue", labels=labels)
        responses = CounterMetricFamily("tdask_stream_responses", "Responses of streamed requests a replica sent",
                                        labels=labels)
        cancelled = CounterMetricFamily("tdask_cancelled_requests",
                                        "Requests whose caller stopped reading or went away before they ended",
                                        labels=labels)
        first = HistogramMetricFamily("tdask_first_response_seconds",
                                      "Time from a streamed request's arrival at a replica to its first response",
                                      labels=labels)
        info = GaugeMetricFamily("tdask_replica_info", "Deployed replicas (value 1)",
                                 labels=[*labels, "device", "instances", "max_inflight", "state"])
        for rid, snap in sorted(replicas.items()):
            values = [str(snap.get("name", "?")), str(snap.get("version", "")), str(rid), str(snap.get("worker", "?"))]
            for outcome in OUTCOMES:
                requests.add_metric([*values, outcome], int(snap.get(outcome, 0)))
            hist = snap.get("latency_histogram")
            if hist:
                latency.add_metric(values, cumulative_buckets(hist), float(hist.get("sum", 0.0)))
            inflight.add_metric(values, int(snap.get("inflight", 0)))
            responses.add_metric(values, int(snap.get("responses", 0)))
            cancelled.add_metric(values, int(snap.get("cancelled", 0)))
            hist = snap.get("first_response_histogram")
            if hist and hist.get("count"):
                first.add_metric(values, cumulative_buckets(hist), float(hist.get("sum", 0.0)))
            queued.add_metric(values, int(snap.get("queued", 0)))
            info.add_metric([*values, str(snap.get("device", "?")), str(snap.get("instances", 1)),
                             str(snap.get("max_inflight", 1)), str(snap.get("state", "?"))], 1)
        server_info = GaugeMetricFamily(
            "tdask_triton_server_info",
            "Triton servers started by tdask (value 1); metrics_url serves each server's own Prometheus metrics",
            labels=["worker", "pid", "grpc_url", "metrics_url"])
        server_up = GaugeMetricFamily("tdask_triton_server_up", "1 while the Triton server process is alive",
                                      labels=["worker", "pid"])
        for server in sorted(triton, key=lambda s: (str(s.get("worker")), str(s.get("pid")))):
            worker, pid = str(server.get("worker", "?")), str(server.get("pid", ""))
            server_info.add_metric([worker, pid, str(server.get("grpc", "")), str(server.get("metrics", ""))], 1)
            server_up.add_metric([worker, pid], 1 if server.get("alive") else 0)
        yield from (requests, latency, inflight, queued, responses, cancelled, first, info, server_info, server_up)


_collector: TdaskCollector | None = None
_collector_lock = threading.Lock()


def collector() -> TdaskCollector:
    """The process-wide collector, registered once on ``prometheus_client.REGISTRY``."""
    global _collector
    with _collector_lock:
        if _collector is None:
            _collector = TdaskCollector()
            try:
                from prometheus_client import REGISTRY
            except ImportError:  # no /metrics without prometheus_client; the dashboard still works
                return _collector
            REGISTRY.register(_collector)
        return _collector
