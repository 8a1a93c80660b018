"""``python -m deploy --log-dir ... --log-level DEBUG``: follow one request through the logs, and the
embedded cluster's dashboard page and ``/metrics``."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest
from conftest import python_env
from test_cli import Proc

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
PY = sys.executable


def test_request_id_followed_across_worker_logs_and_embedded_dashboard(tmp_path):
    env = python_env(DASK_TDASK__ADDRESS_FILE=str(tmp_path / "addr.json"))
    log_dir = tmp_path / "logs"
    deploy = Proc([PY, "-m", "deploy", "--scheduler-port", "0", "--dashboard-address", ":0",
                   "--log-dir", str(log_dir), "--log-level", "DEBUG"], tmp_path / "deploy.log", env)
    try:
        deploy.wait_for("press Ctrl-C to Exit")
        m = re.search(r"Embedded cluster: scheduler (\S+), dashboard (http://\S+)", deploy.text())
        assert m, deploy.text()[-3000:]
        address, dashboard = m.group(1), m.group(2)
        base = dashboard.rsplit("/", 1)[0]
        request_id = f"trace-{uuid.uuid4().hex[:10]}"

        async def one() -> None:
            import tdask

            async with await tdask.connect(address) as session:
                op = await session.operator("encoder_decoder")
                x = np.arange(100, dtype=np.int64)
                result = await op.infer({"input": x}, request_id=request_id)
                assert np.array_equal(result["output"], x)

        asyncio.run(one())

        # one log file per worker, plus each Triton server's
        worker_logs = sorted(log_dir.glob("worker-*.log"))
        assert len(worker_logs) == 3 and len(list(log_dir.glob("triton-*.log"))) == 2, sorted(log_dir.iterdir())
        texts = {p.name: p.read_text() for p in worker_logs}
        hosts = {}
        for name in ("encoder_decoder", "encoder", "decoder"):
            found = [f for f, t in texts.items() if re.search(rf"replica {name}-\w+ of {name} started", t)]
            assert len(found) == 1, (name, found)
            hosts[name] = found[0]

        def lines(name: str) -> list[str]:
            return [line for line in texts[hosts[name]].splitlines() if f"request {request_id}:" in line]

        pipeline = lines("encoder_decoder")
        assert any(": encoder_decoder replica" in line and "received" in line for line in pipeline), pipeline
        assert any(": encoder_decoder replica" in line and "answered" in line for line in pipeline), pipeline
        for name in ("encoder", "decoder"):
            # run by its replica (received, answered), or by encoder_decoder's worker on a lane to its Triton server
            on_lane = [line for line in pipeline
                       if f": {name} replica {name}-" in line and "answered on a lane" in line]
            own = lines(name)
            assert len(on_lane) == 1 or (
                any(f": {name} replica" in line and "received" in line for line in own)
                and any(f": {name} replica" in line and "answered" in line for line in own)), (name, pipeline, own)

        # the embedded scheduler serves the tdask page (listed under More...) and /metrics
        status = urllib.request.urlopen(f"{base}/status", timeout=30).read().decode()
        assert "individual-tdask" in status
        page = urllib.request.urlopen(f"{base}/individual-tdask", timeout=30)
        assert page.status == 200 and "bokeh" in page.read().decode().lower()
        completed = re.compile(r'tdask_requests_total\{operator="encoder_decoder",[^}]*outcome="completed"[^}]*\} 1\.0')
        for _ in range(30):  # the scheduler polls the workers every second
            metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
            if completed.search(metrics):
                break
            time.sleep(0.5)
        assert completed.search(metrics), metrics[-3000:]
        assert "tdask_triton_server_info{" in metrics

        deploy.p.send_signal(signal.SIGTERM)
        assert deploy.p.wait(120) == 0, deploy.text()[-3000:]
    finally:
        deploy.stop()


def test_dask_scheduler_preload_adds_the_page_and_metrics(tmp_path):
    from test_cli import free_port

    env = python_env()
    dask_bin = f"{sys.executable.rsplit('/', 1)[0]}/dask"
    port, dash = free_port(), free_port()
    scheduler = Proc([dask_bin, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address",
                      f"127.0.0.1:{dash}", "--preload", "tdask.observe.dashboard"], tmp_path / "scheduler.log", env)
    try:
        scheduler.wait_for("Scheduler at:")
        base = f"http://127.0.0.1:{dash}"
        for _ in range(60):
            try:
                status = urllib.request.urlopen(f"{base}/status", timeout=10).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert "individual-tdask" in status, "listed under More..."
        assert urllib.request.urlopen(f"{base}/individual-tdask", timeout=30).status == 200
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
        assert "# TYPE tdask_requests_total counter" in metrics and "tdask_request_latency_seconds" in metrics
        assert "Traceback" not in scheduler.text()
        scheduler.p.send_signal(signal.SIGTERM)
        scheduler.p.wait(60)
    finally:
        scheduler.stop()
