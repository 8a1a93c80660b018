"""tdask on the Dask dashboard and on the scheduler's ``/metrics``.

Use it as a scheduler preload::

    dask scheduler --preload tdask.observe.dashboard

(the embedded cluster of ``python -m deploy`` loads it itself). Importing this module adds
the page ``/individual-tdask`` to Dask's dashboard (listed under "More..."); ``dask_setup``
adds :class:`TdaskDashboard`, a scheduler plugin that asks the workers hosting tdask
replicas for their counters (``tdask_stats``) every second, on the scheduler's event loop,
and keeps the answers for the page and for the Prometheus collector of
:mod:`tdask.metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import math
import time
from collections import deque
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from tdask import config
from tdask.comm import protocol
from tdask.observe.metrics import DEFAULT_WINDOW, aggregate, collector, merge_worker_stats
from tdask.registry import FRONTDOORS, ROOT

logger = logging.getLogger(__name__)

PAGE = "/individual-tdask"


class TdaskDashboard(SchedulerPlugin):
    """Polls ``tdask_stats`` on the workers that host replicas; never blocks the event loop."""

    name = "tdask-dashboard"

    def __init__(self, interval: float | None = None, window: float = DEFAULT_WINDOW) -> None:
        self.interval = config.seconds("dashboard.poll-interval") if interval is None else interval
        self.window = window
        self.scheduler: Any = None
        self.replicas: dict[str, Any] = {}
        self.triton: list[dict[str, Any]] = []
        self.frontdoors: list[dict[str, Any]] = []
        self.updated: float | None = None
        self.polls = 0
        self.history: dict[str, deque[tuple[float, float, float, float]]] = {}
        self._task: asyncio.Task | None = None

    # -- life cycle --------------------------------------------------------------------
    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        collector().add_source(self.source)

    async def close(self) -> None:
        collector().remove_source(self.source)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    # -- polling -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("tdask dashboard: polling the workers failed")
            await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    def deployed_workers(self) -> list[str]:
        """Workers named by the deployed operators' records that the scheduler knows."""
        try:
            operators = self.scheduler.get_metadata(keys=list(ROOT), default=None) or {}
        except Exception:
            operators = {}
        workers: set[str] = set()
        for versions in operators.values():
            for record in (versions or {}).values():
                for replica in (record or {}).get("replicas", ()):
                    if replica.get("worker"):
                        workers.add(replica["worker"])
        known = self.scheduler.workers
        return sorted(w for w in workers if w in known)

    async def _ask(self, address: str) -> Any:
        try:
            ask = getattr(self.scheduler.rpc(address), protocol.STATS_HANDLER)
            answer = await asyncio.wait_for(ask(), config.seconds("dashboard.poll-timeout"))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.debug("tdask dashboard: no stats from %s: %r", address, e)
            return None
        if isinstance(answer, dict) and answer.get("status") == "uncaught-error":
            return None
        return answer

    async def poll(self) -> None:
        """Ask every worker hosting replicas, then update the snapshots and the time series."""
        workers = self.deployed_workers()
        answers = await asyncio.gather(*(self._ask(w) for w in workers))
        self.replicas, self.triton = merge_worker_stats(dict(zip(workers, answers, strict=True)))
        now = time.time()
        self.frontdoors = self.live_frontdoors(now)
        self.updated = now
        self.polls += 1
        rows = aggregate(self.replicas, now, self.window)
        seen = set()
        for op in rows["operators"]:
            name = op["operator"]
            seen.add(name)
            self.history.setdefault(name, deque(maxlen=int(config.get("dashboard.history-points")))).append(
                (now, op["rps"], op["p50_ms"], op["p99_ms"]))
        for name in list(self.history):
            if name not in seen:
                del self.history[name]

    def live_frontdoors(self, now: float) -> list[dict[str, Any]]:
        """Front doors that published their counts lately (one killed stops publishing and drops out)."""
        try:
            doors = self.scheduler.get_metadata(keys=list(FRONTDOORS), default=None) or {}
        except Exception:
            doors = {}
        stale = max(10.0, 5 * self.interval)
        return [{"id": k, **v} for k, v in sorted(doors.items())
                if isinstance(v, dict) and now - float(v.get("time", 0)) < stale]

    def source(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The latest snapshots, for the Prometheus collector."""
        return self.replicas, self.triton

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        return aggregate(self.replicas, time.time(), self.window)


def plugin_of(scheduler: Any) -> TdaskDashboard:
    """The scheduler's :class:`TdaskDashboard`; started here when the preload did not add it."""
    plugin = scheduler.plugins.get(TdaskDashboard.name)
    if plugin is None:
        plugin = TdaskDashboard()
        scheduler.add_plugin(plugin)
        asyncio.ensure_future(plugin.start(scheduler))
    return plugin


def dask_setup(scheduler: Any) -> None:
    """Scheduler preload entry point (``dask scheduler --preload tdask.dashboard``)."""
    if TdaskDashboard.name not in scheduler.plugins:
        scheduler.add_plugin(TdaskDashboard())  # the scheduler starts it with its other plugins


# -- the Bokeh page ----------------------------------------------------------------------

def _fmt(value: float, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


REPLICA_COLUMNS = [
    ("operator", "Operator"), ("version", "Version"), ("replica", "Replica"), ("worker", "Worker"),
    ("device", "Device"), ("instances", "Model instances"), ("max_inflight", "Max in-flight"),
    ("inflight", "In-flight"), ("queued", "Queued"), ("completed", "Completed"), ("failed", "Failed"),
    ("rejected", "Rejected"), ("rps", "Requests/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
    ("responses", "Responses streamed"), ("first_p50_ms", "First response p50 ms"), ("state", "State"),
]
OPERATOR_COLUMNS = [
    ("operator", "Operator"), ("version", "Version"), ("replicas", "Replicas"), ("devices", "Device"),
    ("instances", "Model instances"), ("inflight", "In-flight"), ("queued", "Queued"), ("completed", "Completed"),
    ("failed", "Failed"), ("rejected", "Rejected"), ("rps", "Requests/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
    ("responses", "Responses streamed"), ("first_p50_ms", "First response p50 ms"),
]


def _table_data(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> dict[str, list[Any]]:
    data: dict[str, list[Any]] = {key: [] for key, _ in columns}
    for row in rows:
        for key, _ in columns:
            value = row.get(key, "")
            if key == "rps":
                value = _fmt(value, 1)
            elif key.endswith("_ms"):
                value = _fmt(value, 2)
            data[key].append(value if isinstance(value, (int, float, str)) else str(value))
    return data


WIDE = {"operator": 130, "replica": 190, "worker": 190, "devices": 70, "device": 60}


def _columns(columns: list[tuple[str, str]]) -> list[Any]:
    from bokeh.models import TableColumn

    return [TableColumn(field=k, title=t, width=WIDE.get(k, 80)) for k, t in columns]


def _table_height(n_rows: int) -> int:
    return 32 + 26 * max(1, n_rows)


class TdaskPage:
    """The widgets of one browser session of ``/individual-tdask``; updated every second."""

    def __init__(self, plugin: TdaskDashboard) -> None:
        from bokeh.layouts import column, row
        from bokeh.models import ColumnDataSource, DataTable, Div
        from bokeh.plotting import figure

        self.plugin = plugin
        self.header = Div(text="", sizing_mode="stretch_width")
        self.op_source = ColumnDataSource(_table_data([], OPERATOR_COLUMNS))
        self.op_table = DataTable(source=self.op_source, index_position=None, height=140,
                                  sizing_mode="stretch_width",
                                  columns=_columns(OPERATOR_COLUMNS))
        self.replica_source = ColumnDataSource(_table_data([], REPLICA_COLUMNS))
        self.replica_table = DataTable(source=self.replica_source, index_position=None, height=260,
                                       sizing_mode="stretch_width",
                                       columns=_columns(REPLICA_COLUMNS))
        tools = "pan,wheel_zoom,box_zoom,reset"
        self.throughput = figure(title="Throughput per operator (requests/s)", x_axis_type="datetime",
                                 height=260, sizing_mode="stretch_width", tools=tools)
        self.latency = figure(title="Latency per operator (ms; solid p50, dashed p99)", x_axis_type="datetime",
                              height=260, sizing_mode="stretch_width", tools=tools)
        self.throughput.yaxis.axis_label = "requests/s"
        self.latency.yaxis.axis_label = "ms"
        self.series: dict[str, Any] = {}
        self.triton = Div(text="", sizing_mode="stretch_width")
        self.frontdoors = Div(text="", sizing_mode="stretch_width")
        self._column_data_source = ColumnDataSource
        self.root = column(
            self.header,
            Div(text="<b>Operators</b>"), self.op_table,
            Div(text="<b>Replicas</b>"), self.replica_table,
            Div(text="<b>Throughput and latency per operator</b>"),
            row(self.throughput, self.latency, sizing_mode="stretch_width"),
            self.frontdoors,
            self.triton,
            sizing_mode="stretch_width",
        )
        self.update()

    def _series_source(self, name: str) -> Any:
        from bokeh.palettes import Category10

        source = self.series.get(name)
        if source is None:
            color = Category10[10][len(self.series) % 10]
            source = self._column_data_source({"t": [], "rps": [], "p50": [], "p99": []})
            self.throughput.line("t", "rps", source=source, color=color, line_width=2, legend_label=name)
            self.latency.line("t", "p50", source=source, color=color, line_width=2, legend_label=f"{name} p50")
            self.latency.line("t", "p99", source=source, color=color, line_width=1, line_dash="dashed",
                              legend_label=f"{name} p99")
            for fig in (self.throughput, self.latency):
                fig.legend.location = "top_left"
                fig.legend.label_text_font_size = "8pt"
            self.series[name] = source
        return source

    def update(self) -> None:
        plugin = self.plugin
        rows = plugin.rows()
        self.op_source.data = _table_data(rows["operators"], OPERATOR_COLUMNS)
        self.replica_source.data = _table_data(rows["replicas"], REPLICA_COLUMNS)
        for table, n in ((self.op_table, len(rows["operators"])), (self.replica_table, len(rows["replicas"]))):
            if table.height != _table_height(n):
                table.height = _table_height(n)
        age = f"{time.time() - plugin.updated:.1f} s ago" if plugin.updated else "not yet"
        self.header.text = (
            f"<h3 style='margin:4px 0'>tdask operators</h3>"
            f"<span>{len(rows['operators'])} operators, {len(rows['replicas'])} replicas; "
            f"workers polled {age}; requests/s and percentiles over the last {plugin.window:g} s</span>"
        )
        for name, points in list(plugin.history.items()):
            source = self._series_source(name)
            source.data = {
                "t": [p[0] * 1e3 for p in points],
                "rps": [p[1] for p in points],
                "p50": [p[2] for p in points],
                "p99": [p[3] for p in points],
            }
        items = []
        for server in sorted(plugin.triton, key=lambda s: (str(s.get("worker")), str(s.get("pid")))):
            url = html.escape(str(server.get("metrics", "")))
            state = "alive" if server.get("alive") else "<b>down</b>"
            items.append(f"<li>worker {html.escape(str(server.get('worker')))}: pid {server.get('pid')}, "
                         f"gRPC {html.escape(str(server.get('grpc')))}, {state}, "
                         f"metrics <a href='{url}' target='_blank'>{url}</a></li>")
        doors = []
        for door in plugin.frontdoors:
            counts = ", ".join(f"{html.escape(k)}: {n}" for k, n in sorted(door.get("by_status", {}).items()))
            doors.append(f"<li>HTTP {html.escape(str(door.get('http')))}, gRPC {html.escape(str(door.get('grpc')))}"
                         f": requests by protocol and status: {counts or 'none yet'}</li>")
        self.frontdoors.text = ("<b>Front doors</b> (KServe v2; each serves its Prometheus metrics at /metrics)"
                                + (f"<ul>{''.join(doors)}</ul>" if doors else "<p>none</p>"))
        self.triton.text = ("<b>Triton servers</b> (each serves its own Prometheus metrics)"
                            + (f"<ul>{''.join(items)}</ul>" if items else "<p>none</p>"))


def tdask_doc(scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """The ``/individual-tdask`` Bokeh document (called by Dask's dashboard per browser session)."""
    from distributed.dashboard.components.scheduler import BOKEH_THEME

    page = TdaskPage(plugin_of(scheduler))
    doc.add_root(page.root)
    doc.title = "Dask: tdask operators"
    doc.theme = BOKEH_THEME
    doc.add_periodic_callback(page.update, int(config.seconds("dashboard.poll-interval") * 1000))


def _register_page() -> None:
    """Add the page to Dask's dashboard; must happen before the scheduler starts its dashboard."""
    try:
        from distributed.dashboard import scheduler as dashboard_scheduler
    except ImportError:  # no bokeh: no dashboard, /metrics still works
        return
    dashboard_scheduler.applications.setdefault(PAGE, tdask_doc)


_register_page()
