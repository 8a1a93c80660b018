"""The tdask page of the Dask dashboard, opened in a real headless Chromium.

Bokeh 3 renders its widgets inside shadow roots, which ``chromium --dump-dom`` does not
serialize, so the test drives Chromium over the DevTools protocol (its own WebSocket,
no extra package): it navigates to the page, reads the rendered text through the shadow
roots and takes a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT

pytestmark = pytest.mark.timeout(600)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / "docs" / "dashboard.png"

# The text a user sees: every text node, also inside shadow roots (Bokeh 3 widgets).
DEEP_TEXT = """
(() => {
  const out = [];
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.childNodes) {
      if (child.nodeType === Node.TEXT_NODE) { const t = child.textContent.trim(); if (t) out.push(t); }
      else if (child.nodeType === Node.ELEMENT_NODE && !["STYLE", "SCRIPT"].includes(child.tagName)) walk(child);
    }
  };
  walk(document.body || document.documentElement);
  return out.join("\\n");
})()
"""

# Canvases drawn (the time series plots), through the shadow roots.
CANVASES = """
(() => {
  let n = 0;
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) { if (child.tagName === "CANVAS") n++; walk(child); }
  };
  walk(document.body);
  return n;
})()
"""

# The rows of the DataTables as lists of cell texts (SlickGrid cells live in shadow roots).
TABLE_ROWS = """
(() => {
  const rows = [];
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) {
      if (child.classList && child.classList.contains("slick-row")) {
        rows.push(Array.from(child.querySelectorAll(".slick-cell")).map((c) => c.textContent.trim()));
      } else walk(child);
    }
  };
  walk(document.body);
  return JSON.stringify(rows);
})()
"""


class Chromium:
    """A headless Chromium driven over the DevTools protocol."""

    def __init__(self, width: int = 1500, height: int = 1100) -> None:
        self.profile = tempfile.mkdtemp(prefix="tdask-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.ids = itertools.count(1)
        self.ws: Any = None

    def _devtools_port(self, timeout: float = 60) -> int:
        end = time.time() + timeout
        port_file = Path(self.profile) / "DevToolsActivePort"
        while time.time() < end:
            if port_file.exists():
                text = port_file.read_text().split()
                if text:
                    return int(text[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("chromium did not open its DevTools port")

    async def connect(self) -> None:
        from tornado.websocket import websocket_connect

        port = await asyncio.to_thread(self._devtools_port)
        targets = await asyncio.to_thread(
            lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read()))
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=256 * 2**20)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        await self.ws.write_message(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            raw = await asyncio.wait_for(self.ws.read_message(), 60)
            if raw is None:
                raise RuntimeError("DevTools connection closed")
            msg = json.loads(raw)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def screenshot(self, path: Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


async def open_page(url: str, ready: Any, timeout: float = 90) -> tuple[Chromium, str, list[list[str]]]:
    """Open ``url`` and wait until ``ready(text, rows)`` holds; returns the browser, text and rows."""
    browser = Chromium()
    try:
        await browser.connect()
        await browser.call("Page.enable")
        await browser.call("Page.navigate", url=url)
        end = time.time() + timeout
        text, rows = "", []
        while time.time() < end:
            text = await browser.evaluate(DEEP_TEXT) or ""
            rows = json.loads(await browser.evaluate(TABLE_ROWS) or "[]")
            if ready(text, rows):
                break
            await asyncio.sleep(0.5)
        return browser, text, rows
    except BaseException:
        browser.close()
        raise


def _completed_by_operator(rows: list[list[str]]) -> dict[str, int]:
    """Completed counts per operator from the operators table (columns as in tdask.observe.dashboard)."""
    from tdask.observe.dashboard import OPERATOR_COLUMNS

    index = [k for k, _ in OPERATOR_COLUMNS]
    out = {}
    for row in rows:
        if len(row) == len(index) and row[index.index("replicas")].isdigit():
            out[row[0]] = int(row[index.index("completed")])
    return out


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (apt-get install chromium)")
def test_dashboard_page_lists_operators_in_chromium(loop, cluster, session, tmp_path):
    from tdask.frontdoor import FrontDoor

    shot = tmp_path / "dashboard.png"
    door = loop.run(FrontDoor(session, http_port=0, grpc_port=0).start())

    async def load() -> None:
        op = await session.operator("encoder_decoder")
        x = np.arange(1000, dtype=np.int64)
        for _ in range(4):  # a few rounds, so the time series have points
            await asyncio.gather(*(op.infer({"input": x}, request_id=f"dash-{i}") for i in range(25)))
            await asyncio.sleep(1.0)

    loop.run(load(), timeout=300)
    body = json.dumps({"inputs": [{"name": "input", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}).encode()
    for _ in range(3):  # front-door requests, counted on the page by protocol and status
        urllib.request.urlopen(urllib.request.Request(f"{door.http_url}/v2/models/encoder_decoder/infer", data=body),
                               timeout=30).read()
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    status = urllib.request.urlopen(f"{base}/status", timeout=30).read().decode()
    assert "individual-tdask" in status, "the page is listed under More... on Dask's dashboard"

    def ready(text: str, rows: list[list[str]]) -> bool:
        done = _completed_by_operator(rows)
        return all(done.get(name, 0) > 0 for name in ("encoder", "decoder", "encoder_decoder")) \
            and "Triton servers" in text and "Requests/s" in text and "http 200: 3" in text

    async def check() -> None:
        browser, text, rows = await open_page(f"{base}/individual-tdask", ready)
        try:
            done = _completed_by_operator(rows)
            for name in ("encoder", "decoder", "encoder_decoder"):
                assert done.get(name, 0) >= 100, (name, done, text[:3000])
            for header in ("Worker", "Device", "Model instances", "In-flight", "Queued", "Completed", "Failed",
                           "p50 ms", "p99 ms", "Throughput and latency per operator"):
                assert header in text, header
            # every replica has its own row, with its worker and device
            replica_rows = [r for r in rows if len(r) > 5 and re.match(r"^(encoder|decoder|encoder_decoder)-", r[2])]
            assert len(replica_rows) == 4, rows
            assert all(r[3].startswith("tcp://") and r[4] == "CPU" for r in replica_rows), replica_rows
            assert await browser.evaluate(CANVASES) >= 2, "the throughput and latency plots are drawn"
            assert re.search(r"metrics\s+http://[\d.]+:\d+/metrics", text), "Triton metrics URLs are listed"
            assert f"HTTP {door.http_url}, gRPC {door.grpc_address}: requests by protocol and status: http 200: 3" \
                in " ".join(text.split()), "the front door and its requests are listed"
            await browser.screenshot(shot)
            assert shot.stat().st_size > 10_000
            if os.environ.get("TDASK_SAVE_SCREENSHOT") == "1":  # refresh the README's picture
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT)
        finally:
            browser.close()

    try:
        asyncio.run(check())
    finally:
        loop.run(door.close())
