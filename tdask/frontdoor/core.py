"""What both front doors share: operators looked up in the cluster's session, one call path into tdask's own
request path (routing, backpressure, lanes), and the front door's metrics by protocol and status."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from tdask import config
from tdask.errors import InvalidRequestError, OperatorNotFoundError
from tdask.frontdoor import kserve
from tdask.registry import operator_key
from tdask.session import InferResult, RemoteOperator, ResponseStream, Session
from tdask.session.futures import new_request_id
from tdask.tensors import check_request_size

logger = logging.getLogger("tdask.frontdoor")

SERVER_NAME = "tdask"
EXTENSIONS = ["binary_tensor_data", "statistics", "model_repository", "schedule_policy"]


@dataclass
class ModelStats:
    """Per-model counts of one front door, in the shape of Triton's statistics extension."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


class FrontDoorCore:
    """One front door's view of the deployment (any operator, any version) and its counters."""

    def __init__(self, session: Session, registry: CollectorRegistry | None = None) -> None:
        self.session = session
        self.max_request_bytes = int(config.get("replica.max-request-bytes"))  # tensors of one request, at most
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("tdask_frontdoor_requests", "Requests answered by the front door",
                                ["protocol", "model", "status"], registry=self.registry)
        self.latency = Histogram("tdask_frontdoor_request_seconds", "Front-door request latency (receipt to answer)",
                                 ["protocol", "model"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                          5, 10, 30, 60, 120))
        self.responses = Counter("tdask_frontdoor_stream_responses", "Responses of streamed requests sent",
                                 ["protocol", "model"], registry=self.registry)
        self.first_response = Histogram("tdask_frontdoor_first_response_seconds",
                                        "Streamed requests' time to first response (receipt to first response)",
                                        ["protocol", "model"], registry=self.registry,
                                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                 2.5, 5, 10, 30, 60, 120))
        self.stats: dict[tuple[str, int], ModelStats] = {}
        try:
            self.version = importlib.metadata.version("tdask")
        except importlib.metadata.PackageNotFoundError:
            self.version = "unknown"

    # -- models -------------------------------------------------------------------------
    async def operator(self, model: str, version: str | int | None = None) -> RemoteOperator:
        """The deployed operator ``model`` at ``version`` ("" or None: the latest)."""
        if version in (None, ""):
            wanted = None
        else:
            try:
                wanted = int(version)
            except (TypeError, ValueError):
                raise OperatorNotFoundError(f"model {model!r} has no version {version!r}") from None
        return await self.session.operator(model, wanted)

    async def server_ready(self) -> bool:
        """Ready while the cluster's scheduler answers (it knows where every operator runs)."""
        try:
            await self.session.operators()
        except Exception:  # noqa: BLE001 - any failure to reach it means not ready
            return False
        return True

    async def ready(self, model: str, version: str | int | None = None) -> bool:
        try:
            op = await self.operator(model, version)
            await op.refresh()
        except OperatorNotFoundError:
            return False
        return bool(op.replicas)

    async def metadata(self, model: str, version: str | int | None = None) -> dict[str, Any]:
        op = await self.operator(model, version)
        declared = op.record.get("metadata") or {}
        versions = await self.session.lookup(operator_key(model))
        return {
            "name": model,
            "versions": sorted((versions or {}), key=int),
            "platform": declared.get("platform", "tdask"),
            "inputs": list(declared.get("inputs", [])),
            "outputs": list(declared.get("outputs", [])),
        }

    async def index(self) -> list[dict[str, Any]]:
        out = []
        for name, versions in sorted((await self.session.operators()).items()):
            for v, record in sorted((versions or {}).items(), key=lambda kv: int(kv[0])):
                out.append({"name": name, "version": str(v),
                            "state": "READY" if record.get("replicas") else "UNAVAILABLE"})
        return out

    # -- inference ----------------------------------------------------------------------
    async def infer(self, protocol: str, model: str, version: str | int | None, inputs: dict[str, np.ndarray],
                    parameters: Mapping[str, Any], request_id: str | None,
                    ) -> tuple[RemoteOperator, dict[str, np.ndarray], str]:
        """Check a decoded request against the operator's metadata and run it on tdask's request path."""
        op = await self.operator(model, version)
        kserve.check_inputs(model, op.record.get("metadata"), inputs)
        rid = request_id or new_request_id()
        check_request_size(inputs, rid, self.max_request_bytes)
        timeout = kserve.timeout_of(parameters)
        result = await op.infer(inputs, kserve.operator_parameters(parameters), request_id=rid, timeout=timeout,
                                output_device="cpu")
        return op, self.outputs_of(model, result), rid

    async def stream(self, model: str, version: str | int | None, inputs: dict[str, np.ndarray],
                     parameters: Mapping[str, Any], request_id: str | None,
                     ) -> tuple[RemoteOperator, ResponseStream, str]:
        """Like :meth:`infer`, for a request answered with a sequence of responses (one for most operators);
        the protocol's ``timeout`` bounds the wait for each response."""
        op = await self.operator(model, version)
        kserve.check_inputs(model, op.record.get("metadata"), inputs)
        rid = request_id or new_request_id()
        check_request_size(inputs, rid, self.max_request_bytes)
        responses = op.stream(inputs, kserve.operator_parameters(parameters), request_id=rid,
                              timeout=kserve.timeout_of(parameters), output_device="cpu")
        return op, responses, rid

    @staticmethod
    def outputs_of(model: str, result: InferResult) -> dict[str, np.ndarray]:
        """An answer's outputs as the protocols send them (little-endian arrays)."""
        outputs = {}
        for name, value in result.outputs.items():
            if not isinstance(value, np.ndarray):  # an operator answered something that is not a tensor
                raise InvalidRequestError(f"model {model!r}: output {name!r} is {type(value).__name__}, not a tensor")
            outputs[name] = kserve.little_endian(value)
        return outputs

    def responded(self, protocol: str, op: RemoteOperator, started: float, first: bool) -> None:
        """Count one response of a streamed request (and its time to first response)."""
        self.responses.labels(protocol, op.name).inc()
        if first:
            self.first_response.labels(protocol, op.name).observe(time.perf_counter() - started)

    def record(self, protocol: str, op: RemoteOperator | None, status: str, ok: bool, started: float,
               request_id: str | None = None, error: BaseException | None = None) -> None:
        """Count one answered request (metrics, the statistics extension, the log). Requests for models not
        deployed count under ``model=""``: what clients send never grows the metrics without bound."""
        elapsed = time.perf_counter() - started
        model = op.name if op is not None else ""
        self.requests.labels(protocol, model, status).inc()
        self.latency.labels(protocol, model).observe(elapsed)
        if op is None:
            if not ok:
                logger.info("%s request %s failed (%s): %s", protocol, request_id, status, error)
            return
        stats = self.stats.setdefault((model, op.version), ModelStats())
        ns = int(elapsed * 1e9)
        if ok:
            stats.success += 1
            stats.success_ns += ns
            stats.last_inference_ms = int(time.time() * 1000)
            logger.debug("%s request %s to %s: %s in %.3f ms", protocol, request_id, model, status, elapsed * 1e3)
        else:
            stats.fail += 1
            stats.fail_ns += ns
            logger.info("%s request %s to %s failed (%s): %s", protocol, request_id, model, status, error)
        stats.by_status[status] = stats.by_status.get(status, 0) + 1

    def summary(self) -> dict[str, Any]:
        """Requests answered so far by protocol and status, and per model: what the dashboard shows."""
        by_status: dict[str, int] = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    key = f"{sample.labels['protocol']} {sample.labels['status']}"
                    by_status[key] = by_status.get(key, 0) + int(sample.value)
        models = {f"{name} v{v}": s.success + s.fail for (name, v), s in self.stats.items()}
        responses = sum(int(sample.value) for metric in self.responses.collect() for sample in metric.samples
                        if sample.name.endswith("_total"))
        return {"by_status": by_status, "by_model": models, "stream_responses": responses,
                "first_response_p50_ms": _median_ms(self.first_response)}

    def statistics(self, model: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        """This front door's counts in the shape of Triton's ``/v2/models/{name}/stats``."""
        out = []
        for (name, v), s in sorted(self.stats.items()):
            if (model and name != model) or (version and str(v) != str(version)):
                continue
            out.append({
                "name": name, "version": str(v), "last_inference": s.last_inference_ms,
                "inference_count": s.success, "execution_count": s.success,
                "inference_stats": {"success": {"count": s.success, "ns": s.success_ns},
                                    "fail": {"count": s.fail, "ns": s.fail_ns}},
            })
        return out


def _median_ms(histogram: Histogram) -> float | None:
    """A histogram's median over every label, in milliseconds (the upper bound of its bucket); None when empty."""
    counts: dict[float, float] = {}
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                counts[bound] = counts.get(bound, 0) + sample.value
    total = counts.get(float("inf"), 0)
    if not total:
        return None
    for bound in sorted(counts):
        if counts[bound] >= total / 2:
            return bound * 1e3 if bound != float("inf") else None
    return None
