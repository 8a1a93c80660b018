"""Where replicas go: pure logic over the scheduler's view of workers, unit-tested alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tdask.errors import PlacementError
from tdask.operator import OperatorConfig


@dataclass
class WorkerSlots:
    """A worker as placement sees it: its resources and what already runs there."""

    address: str
    name: str
    resources: dict[str, float]
    replicas: int = 0
    gpus_used: int = 0
    hosted: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))


def _describe(workers: Sequence[WorkerSlots]) -> str:
    return "; ".join(f"{w.name} ({w.address}) resources={w.resources or '{}'}" for w in workers) or "no workers"


def plan_placement(
    configs: Sequence[OperatorConfig],
    workers: Mapping[str, Mapping[str, Any]],
    existing: Mapping[str, Mapping[str, int]] | None = None,
) -> list[tuple[OperatorConfig, int, str]]:
    """Assign each replica of each operator a worker address.

    Each replica takes the eligible worker with the fewest replicas, so replicas get a
    worker of their own while there are enough and share otherwise. GPU replicas also
    need a free GPU: Dask actors hold no resources, so tdask counts them itself.
    ``existing`` gives, per address, ``{"replicas": n, "gpus_used": k}`` already placed.
    """
    existing = existing or {}
    slots = [
        WorkerSlots(
            address=addr,
            name=str(info.get("name", addr)),
            resources={k: float(v) for k, v in (info.get("resources") or {}).items()},
            replicas=int(existing.get(addr, {}).get("replicas", 0)),
            gpus_used=int(existing.get(addr, {}).get("gpus_used", 0)),
        )
        for addr, info in sorted(workers.items(), key=lambda kv: str(kv[1].get("name", kv[0])))
    ]
    if not slots:
        raise PlacementError("the cluster has no workers")
    plan = []
    for cfg in configs:
        needed = cfg.required_resources()
        eligible = [w for w in slots if all(w.resources.get(k, 0) >= v for k, v in needed.items())]
        if not eligible:
            raise PlacementError(
                f"operator {cfg.name!r} needs worker resources {needed}, and no worker has them "
                f"(workers: {_describe(slots)}). Start workers with e.g. "
                f"`dask worker <scheduler> --resources \"{','.join(f'{k}={v:g}' for k, v in needed.items())}\"`"
            )
        for index in range(cfg.replicas):
            candidates = [w for w in eligible if cfg.device != "GPU" or w.gpus_used < w.gpus]
            if not candidates:
                free = sum(max(0, w.gpus - w.gpus_used) for w in eligible)
                raise PlacementError(
                    f"operator {cfg.name!r} replica {index + 1} of {cfg.replicas} needs a GPU of its own, "
                    f"but no GPU is free on eligible workers ({free} free; one GPU replica per GPU)"
                )
            chosen = min(candidates, key=lambda w: w.replicas)
            chosen.replicas += 1
            chosen.hosted.append(cfg.name)
            if cfg.device == "GPU":
                chosen.gpus_used += 1
            plan.append((cfg, index, chosen.address))
    return plan
