"""What a replica counts about itself: read by deploy, the dashboard and ``/metrics`` (:mod:`tdask.observe`)."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from typing import Any

from tdask import config

# Upper bounds (seconds) of the latency histogram's buckets; +Inf is implied.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


class LatencyLog(deque):
    """The recent ``(finished_at, seconds)`` samples of a replica, plus a cumulative histogram.

    The deque keeps only the last ``maxlen`` samples (for windows and percentiles);
    every sample ever appended is also counted in :data:`LATENCY_BUCKETS` so that
    Prometheus gets an exact histogram however fast requests come.
    """

    def __init__(self, iterable: Iterable[tuple[float, float]] = (), maxlen: int | None = 4096) -> None:
        super().__init__((), maxlen)
        self.bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # non-cumulative, last one is +Inf
        self.total = 0.0
        self.count = 0
        for item in iterable:
            self.append(item)

    def append(self, item: tuple[float, float]) -> None:
        super().append(item)
        seconds = float(item[1])
        self.bucket_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def histogram(self) -> dict[str, Any]:
        """``{"bounds": [...], "counts": [... one more than bounds], "sum": s, "count": n}``."""
        return {"bounds": list(LATENCY_BUCKETS), "counts": list(self.bucket_counts), "sum": self.total,
                "count": self.count}


class ReplicaStats:
    """Counters a replica keeps about itself; read by deploy, the dashboard and /metrics."""

    def __init__(self) -> None:
        self.completed = 0
        self.failed = 0
        self.rejected = 0
        self.inflight = 0
        self.queued = 0
        self.leased = 0  # slots lent to callers that run requests on this replica's Triton server themselves
        self.on_lanes = 0  # requests they ran on them (counted in completed and failed too)
        self.revoked = 0  # slots asked back from them
        self.responses = 0  # responses of streamed requests sent
        self.cancelled = 0  # requests whose caller stopped reading or went away before they ended
        self.first_responses: deque[tuple[float, float]] = LatencyLog(maxlen=int(config.get("replica.latency-samples")))
        # (finished at, seconds); also counts every sample in a cumulative histogram (for /metrics)
        self.latencies: deque[tuple[float, float]] = LatencyLog(maxlen=int(config.get("replica.latency-samples")))

    def snapshot(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "failed": self.failed,
            "rejected": self.rejected,
            "inflight": self.inflight,
            "queued": self.queued,
            "leased": self.leased,
            "on_lanes": self.on_lanes,
            "revoked": self.revoked,
            "responses": self.responses,
            "cancelled": self.cancelled,
            "latencies": list(self.latencies),
            "latency_histogram": self.latencies.histogram(),
            "first_responses": list(self.first_responses),
            "first_response_histogram": self.first_responses.histogram(),
        }
