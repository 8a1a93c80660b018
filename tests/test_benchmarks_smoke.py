"""CI runs the benchmark harness in its smoke mode so it cannot rot (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, python_env

pytestmark = pytest.mark.slow

def test_benchmark_smoke_run_writes_every_cell(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--output", str(out)],
        cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    settings = results["settings"]
    expected = {(size, c) for size in settings["sizes"] for c in settings["concurrency"]}
    assert {(c["size"], c["concurrency"]) for c in results["cells"]} == expected
    for cell in results["cells"]:
        shm = {"direct_shm"} if cell["size"] >= settings["shm_min_size"] else set()
        assert set(cell["systems"]) == {"direct", "direct_sync", *shm, "tdask_pipeline", "tdask_chained",
                                        "tdask_pipeline_deploy_layout"}
        assert cell["reference"] in {"direct", "direct_sync", *shm}
        for name, s in cell["systems"].items():
            assert s["requests"] > 0 and s["errors"] == 0, (cell["size"], cell["concurrency"], name, s)
            for key in ("throughput", "p50_ms", "p99_ms"):
                assert s[key] is not None and s[key] > 0
        for name in ("tdask_pipeline", "tdask_chained", "tdask_pipeline_deploy_layout"):
            assert cell["systems"][name]["throughput_ratio"] is not None
    cells = [(r["size"], r["concurrency"], r["protocol"]) for r in results["frontdoor"]]
    assert cells == [(1000, 1, "grpc"), (1000, 1, "http"), (100_000, 1, "grpc")]
    for row in results["frontdoor"]:
        systems = row["systems"]
        assert set(systems) == {f"{side}_{row['protocol']}" for side in ("direct", "frontdoor", "workerdoor")}
        assert all(s["requests"] > 0 and s["errors"] == 0 for s in systems.values()), systems
        for side in ("frontdoor", "workerdoor"):
            assert systems[f"{side}_{row['protocol']}"]["throughput_ratio"] is not None
    assert [row["replicas"] for row in results["scaling"]] == settings["scaling"]
    for row in results["scaling"]:
        assert set(row["systems"]) == {"direct", "tdask_pipeline"}
        assert all(s["requests"] > 0 and s["errors"] == 0 for s in row["systems"].values())
        assert row["efficiency"] is not None
    memory = results["memory"]
    assert memory["result"]["requests"] == settings["memory_requests"] and memory["result"]["errors"] == 0
    kinds = {p["process"] for p in memory["processes"]}
    assert {"benchmark client + scheduler", "dask worker", "tdask tritonserver", "direct tritonserver"} <= kinds
    assert all(p["rss_peak_mb"] > 0 for p in memory["processes"])
    assert "| direct |" in results["table_markdown"]


def test_mechanisms_smoke_run_measures_each_mechanism_on_and_off_and_the_switch_reaches_the_workers(tmp_path):
    out = tmp_path / "mechanisms.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.mechanisms", "--smoke", "--mechanisms", "lanes,socket", "--layouts", "3",
         "--output", str(out)],
        cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["mechanism"], row["workers"]) for row in rows] == [("lanes", 3), ("socket", 3)]
    for row in rows:
        for key, off_value in row["off_settings"].items():
            assert {value[key] for value in row["workers_saw"]["off"].values()} == {off_value}, row["workers_saw"]
            assert off_value not in {value[key] for value in row["workers_saw"]["on"].values()}
        for cell in row["cells"]:
            assert cell["on"]["requests"] > 0 and cell["off"]["requests"] > 0
            assert cell["on"]["errors"] == 0 and cell["off"]["errors"] == 0
            assert cell["gain"] is not None


def test_streaming_benchmark_interleaves_both_sides_and_writes_its_ratios(tmp_path):
    out = tmp_path / "streaming.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.streaming", "--rounds", "2", "--requests", "2", "--responses", "5",
         "--output", str(out)],
        cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["first_each_round"] == ["direct", "tdask"]
    for side in ("direct", "tdask"):
        assert len(results[side]["rounds"]) == 2
        assert results[side]["responses_per_s"] > 0 and results[side]["first_response_p50_ms"] > 0
    assert results["responses_per_s_ratio"] > 0
    assert "tdask / direct: first response" in proc.stdout
