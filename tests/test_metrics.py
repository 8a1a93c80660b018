"""Operator metrics: aggregation (unit) and the scheduler's ``/metrics`` after a known load (integration)."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections import defaultdict

import numpy as np
import pytest

from tdask.observe.metrics import (
    TdaskCollector,
    aggregate,
    cumulative_buckets,
    merge_worker_stats,
    percentile,
    replica_row,
)
from tdask.worker.stats import LATENCY_BUCKETS, LatencyLog

NOW = 1_000_000.0


def snapshot(name: str, replica: str, latencies: list[tuple[float, float]], **kw) -> dict:
    log = LatencyLog(latencies)
    return {"name": name, "version": 1, "replica": replica, "worker": kw.pop("worker", "tcp://w1"),
            "device": "CPU", "instances": 2, "max_inflight": 4, "state": "running",
            "completed": len(latencies), "failed": 0, "rejected": 0, "inflight": 0, "queued": 0,
            "latencies": list(log), "latency_histogram": log.histogram(), **kw}


# -- unit ---------------------------------------------------------------------------------


def test_percentile_interpolates_and_is_nan_when_empty():
    assert math.isnan(percentile([], 50))
    assert percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99.0
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3


def test_latency_log_counts_every_sample_in_the_histogram_even_beyond_its_window():
    log = LatencyLog(maxlen=3)
    for i, seconds in enumerate([0.0001, 0.0005, 0.003, 0.2, 100.0]):
        log.append((NOW + i, seconds))
    assert len(log) == 3  # recent samples only
    hist = log.histogram()
    assert hist["count"] == 5 and hist["sum"] == pytest.approx(100.2036)
    assert len(hist["counts"]) == len(LATENCY_BUCKETS) + 1 and sum(hist["counts"]) == 5
    cumulative = dict(cumulative_buckets(hist))
    assert cumulative["0.0005"] == 2  # le is inclusive: 0.0005 falls in the 0.0005 bucket
    assert cumulative["0.005"] == 3
    assert cumulative["0.25"] == 4
    assert cumulative["60.0"] == 4 and cumulative["+Inf"] == 5
    values = [c for _, c in cumulative_buckets(hist)]
    assert values == sorted(values)


def test_replica_row_rates_and_percentiles_over_the_window():
    # 20 requests in the last 10 s (10 ms each), 5 older ones (1 s each) outside the window
    lat = [(NOW - 30 + i, 1.0) for i in range(5)] + [(NOW - 9.5 + i * 0.45, 0.010) for i in range(20)]
    row = replica_row(snapshot("encoder", "encoder-a", lat, inflight=3, queued=7, failed=2), NOW, window=10)
    assert row["rps"] == pytest.approx(2.0)
    assert row["p50_ms"] == pytest.approx(10.0) and row["p99_ms"] == pytest.approx(10.0)
    assert (row["operator"], row["replica"], row["worker"], row["device"], row["instances"]) == \
        ("encoder", "encoder-a", "tcp://w1", "CPU", 2)
    assert (row["inflight"], row["queued"], row["completed"], row["failed"]) == (3, 7, 25, 2)
    idle = replica_row(snapshot("encoder", "encoder-b", []), NOW)
    assert idle["rps"] == 0 and math.isnan(idle["p50_ms"])


def test_rate_stays_right_when_the_sample_log_is_full():
    # 4096 samples within the last 2 s: the rate is 2048/s even though the window is 10 s
    lat = [(NOW - 2 + i * (2 / 4096), 0.001) for i in range(1, 4097)]
    row = replica_row(snapshot("decoder", "decoder-a", lat), NOW, window=10)
    assert row["rps"] == pytest.approx(2048, rel=0.01)


def test_aggregate_sums_replicas_and_merges_their_samples():
    fast = [(NOW - 1 - i * 0.1, 0.001) for i in range(30)]
    slow = [(NOW - 1 - i * 0.1, 0.100) for i in range(10)]
    snaps = {
        "encoder-a": snapshot("encoder", "encoder-a", fast, inflight=1),
        "encoder-b": snapshot("encoder", "encoder-b", slow, worker="tcp://w2", queued=2, rejected=1),
        "decoder-a": snapshot("decoder", "decoder-a", fast[:5], failed=4),
    }
    rows = aggregate(snaps, NOW, window=10)
    assert [r["replica"] for r in rows["replicas"]] == ["decoder-a", "encoder-a", "encoder-b"]
    ops = {r["operator"]: r for r in rows["operators"]}
    enc = ops["encoder"]
    assert (enc["replicas"], enc["instances"], enc["completed"], enc["inflight"], enc["queued"], enc["rejected"]) == \
        (2, 4, 40, 1, 2, 1)
    assert enc["rps"] == pytest.approx(4.0)
    assert enc["p50_ms"] == pytest.approx(1.0)  # 30 of the 40 merged samples are 1 ms
    assert enc["p99_ms"] == pytest.approx(100.0)
    assert ops["decoder"]["failed"] == 4 and ops["decoder"]["devices"] == "CPU"


def test_merge_worker_stats_flattens_answers_and_skips_missing_workers():
    answers = {
        "tcp://w1": {"replicas": {"r1": {"name": "encoder", "completed": 3}},
                     "triton": [{"pid": 11, "grpc": "h:1", "metrics": "http://h:2/metrics", "alive": True}]},
        "tcp://w2": None,
        "tcp://w3": {"replicas": {"r2": {"name": "decoder", "completed": 1}}, "triton": []},
    }
    replicas, triton = merge_worker_stats(answers)
    assert replicas["r1"]["worker"] == "tcp://w1" and replicas["r2"]["name"] == "decoder"
    assert triton == [{"worker": "tcp://w1", "pid": 11, "grpc": "h:1", "metrics": "http://h:2/metrics", "alive": True}]


def test_collector_exposes_counters_histogram_gauges_and_triton_urls():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    snaps = {"encoder-a": snapshot("encoder", "encoder-a", [(NOW, 0.002), (NOW, 0.02)], failed=1, rejected=2,
                                   inflight=3, queued=4)}
    triton = [{"worker": "tcp://w1", "pid": 42, "grpc": "127.0.0.1:1", "metrics": "http://127.0.0.1:2/metrics",
               "alive": True}]
    collector = TdaskCollector()
    collector.add_source(lambda: (snaps, triton))
    registry = CollectorRegistry()
    registry.register(collector)
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    base = (("operator", "encoder"), ("replica", "encoder-a"), ("version", "1"), ("worker", "tcp://w1"))

    def get(name, **extra):
        return samples[(name, tuple(sorted(dict(base, **extra).items())))]

    assert get("tdask_requests_total", outcome="completed") == 2
    assert get("tdask_requests_total", outcome="failed") == 1
    assert get("tdask_requests_total", outcome="rejected") == 2
    assert get("tdask_request_latency_seconds_count") == 2
    assert get("tdask_request_latency_seconds_sum") == pytest.approx(0.022)
    assert get("tdask_request_latency_seconds_bucket", le="0.0025") == 1
    assert get("tdask_request_latency_seconds_bucket", le="+Inf") == 2
    assert get("tdask_inflight_requests") == 3 and get("tdask_queued_requests") == 4
    assert get("tdask_replica_info", device="CPU", instances="2", max_inflight="4", state="running") == 1
    key = ("tdask_triton_server_info", (("grpc_url", "127.0.0.1:1"), ("metrics_url", "http://127.0.0.1:2/metrics"),
                                        ("pid", "42"), ("worker", "tcp://w1")))
    assert samples[key] == 1
    assert samples[("tdask_triton_server_up", (("pid", "42"), ("worker", "tcp://w1")))] == 1
    collector.remove_source(collector.sources()[0])
    assert "tdask_requests_total{" not in generate_latest(registry).decode()


# -- integration: the scheduler's /metrics --------------------------------------------------


def scrape(url: str) -> dict[str, dict]:
    """Per operator: completed/failed/rejected counters and the histogram count, summed over replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=30).read().decode()
    out: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            op = s.labels.get("operator")
            if s.name == "tdask_requests_total":
                out[op][s.labels["outcome"]] += s.value
            elif s.name == "tdask_request_latency_seconds_count":
                out[op]["histogram_count"] += s.value
            elif s.name in ("tdask_inflight_requests", "tdask_queued_requests"):
                out[op][s.name] += s.value
            elif s.name == "tdask_triton_server_info":
                out["_triton"][s.labels["metrics_url"]] = s.value
    return {k: dict(v) for k, v in out.items()}


OPERATORS = ("encoder", "decoder", "encoder_decoder")


def test_scheduler_metrics_count_exactly_the_requests_sent(loop, cluster, session):
    url = cluster.dashboard_link.rsplit("/", 1)[0] + "/metrics"
    plugin = cluster.scheduler.plugins["tdask-dashboard"]

    def settled() -> dict:
        polls = plugin.polls
        end = time.time() + 30
        while plugin.polls < polls + 2 and time.time() < end:  # two fresh polls after the last activity
            time.sleep(0.2)
        return scrape(url)

    before = settled()
    n = 57

    async def send() -> None:
        op = await session.operator("encoder_decoder")
        x = np.arange(500, dtype=np.int64)
        results = await asyncio.gather(*(op.infer({"input": x}, request_id=f"metrics-{i}") for i in range(n)))
        assert all(np.array_equal(r["output"], x) for r in results)

    loop.run(send())
    end = time.time() + 30
    while time.time() < end:
        after = scrape(url)
        if all(after.get(op, {}).get("completed", 0) >= before.get(op, {}).get("completed", 0) + n
               for op in OPERATORS):
            break
        time.sleep(0.3)
    after = settled()  # and it does not count more than that
    for op in OPERATORS:
        b, a = before.get(op, {}), after[op]
        assert a["completed"] - b.get("completed", 0) == n, (op, b, a)
        assert a["histogram_count"] - b.get("histogram_count", 0) == n, (op, b, a)
        assert a["failed"] == b.get("failed", 0) and a["rejected"] == b.get("rejected", 0), (op, b, a)
        assert a["tdask_inflight_requests"] == 0 and a["tdask_queued_requests"] == 0
    # each Triton server's own metrics are listed and reachable
    triton_urls = list(after["_triton"])
    assert triton_urls, after
    text = urllib.request.urlopen(triton_urls[0], timeout=30).read().decode()
    assert "nv_inference_request_success" in text


def test_client_summary_table_and_json():
    from tdask.cli.client import ClientStats, summarize, summary_table

    a = ClientStats(latencies=[0.010, 0.020, 0.030])
    b = ClientStats(latencies=[0.005] * 4, errors=["OverloadedError: full"])
    summary = summarize([a, b], total_time=2.0)
    assert (summary["requests"], summary["errors"], summary["throughput"]) == (7, 1, 3.5)
    assert summary["latency_ms"]["p50"] == pytest.approx(5.0)
    assert [c["requests"] for c in summary["clients"]] == [3, 4]
    assert summary["clients"][0]["latency_ms"]["p90"] == pytest.approx(28.0)
    lines = summary_table(summary).splitlines()
    assert lines[0].split(" | ") == ["Client", "Requests", "Errors", "Throughput (req/s)", "p50 ms", "p90 ms",
                                     "p99 ms"]
    assert lines[-1].split() == ["all", "|", "7", "|", "1", "|", "3.50", "|", "5.00", "|", "24.00", "|", "29.40"]
    assert len(lines) == 6 and len({len(line) for line in lines}) == 1  # aligned
    single = summary_table(summarize([a], total_time=1.0)).splitlines()
    assert len(single) == 3 and single[-1].startswith("all")
