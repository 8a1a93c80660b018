"""The embedded cluster of ``python -m deploy``, and where it announces its address."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

import dask.config
from distributed import LocalCluster

from tdask import config

DEFAULT_SCHEDULER_ADDRESS = "tcp://127.0.0.1:8786"


def address_file() -> str:
    """Where an embedded deploy writes its addresses for ``python -m tdask.client``."""
    path = config.get("address-file")
    if path:
        return str(path)
    return os.path.join(tempfile.gettempdir(), f"tdask-{os.getuid()}", "embedded-cluster.json")


def write_address_file(scheduler_address: str, dashboard_link: str | None, **more: str) -> str:
    """Announce an embedded deploy's addresses (``more``: its front door's) to clients on this machine."""
    path = address_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"scheduler_address": scheduler_address, "dashboard_link": dashboard_link, "pid": os.getpid(),
                   **more}, f)
    os.replace(tmp, path)
    return path


def remove_address_file() -> None:
    path = address_file()
    try:
        with open(path) as f:
            if json.load(f).get("pid") != os.getpid():
                return
        os.remove(path)
    except (OSError, ValueError):
        pass


def announced_scheduler_address() -> str:
    """The address an embedded deploy announced (if it still runs), else Dask's default."""
    return announced("scheduler_address") or DEFAULT_SCHEDULER_ADDRESS


def announced(key: str) -> str | None:
    """One address a running embedded deploy announced (``scheduler_address``, ``http``, ``grpc``), if any."""
    try:
        with open(address_file()) as f:
            info = json.load(f)
        os.kill(int(info["pid"]), 0)
        return str(info[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def count_gpus() -> int:
    """GPUs visible here, by ``nvidia-smi -L``; 0 when there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


async def start_embedded_cluster(
    n_workers: int,
    gpus: int = 0,
    protocol: str = "tcp",
    scheduler_port: int = 8786,
    dashboard_address: str = ":8787",
    security: Any = None,
    **kwargs: Any,
) -> LocalCluster:
    """A LocalCluster of real worker processes, one thread each; plus one ``GPU=1`` worker per GPU.

    CPU operators need no resource tag, so the CPU workers carry none.
    """
    host = "127.0.0.1" if protocol != "ucx" else None
    scheduler_kwargs = dict(kwargs.pop("scheduler_kwargs", None) or {})
    scheduler_kwargs.setdefault("preload", ["tdask.observe.dashboard"])  # the tdask dashboard page and /metrics
    # the scheduler reads them as it is made; each Nanny hands its config to the worker it starts, also to
    # workers added later by cluster.scale() (hence also the Nanny's own config)
    dask_config = cluster_dask_config()
    kwargs["config"] = {**dask_config, **(kwargs.get("config") or {})}
    with dask.config.set({**dask_config, "distributed.nanny.pre-spawn-environ": worker_environ()}):
        cluster = await LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            protocol=f"{protocol}://" if protocol else None,
            host=host,
            scheduler_port=scheduler_port,
            dashboard_address=dashboard_address,
            security=security,
            asynchronous=True,
            preload=["tdask.deploy._embedded_worker"],
            scheduler_kwargs=scheduler_kwargs,
            **kwargs,
        )
        if gpus:
            # one GPU=1 worker per GPU; asking for more workers than GPUs shares them round robin
            # (two workers on one GPU still exercise CUDA IPC between processes)
            found = max(1, count_gpus())
            for i in range(gpus):
                spec = copy.deepcopy(cluster.new_spec)
                options = spec.setdefault("options", {})
                options["resources"] = {"GPU": 1}
                options["env"] = {**options.get("env", {}), "CUDA_VISIBLE_DEVICES": str(i % found)}
                cluster.worker_spec[f"gpu-{i}"] = spec
            await cluster._correct_state()
            await cluster.scheduler_comm.identity()
    return cluster


def cluster_dask_config() -> dict[str, Any]:
    """tdask's ``embedded-cluster.dask-config``: Dask settings of the embedded cluster's scheduler and workers,
    as dotted keys (nested ones too: ``dask.config.set`` would replace a whole subtree such as ``distributed``);
    a key set to None keeps Dask's own setting, since a config file cannot remove one that tdask.yaml sets."""
    flat: dict[str, Any] = {}

    def walk(settings: dict[str, Any], prefix: str) -> None:
        for key, value in settings.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value  # later keys win: a user's file is merged after tdask.yaml

    walk(dict(config.get("embedded-cluster.dask-config") or {}), "")
    return {key: value for key, value in flat.items() if value is not None}


def worker_environ() -> dict[str, Any]:
    """Dask's pre-spawn environment for worker processes, with tdask's ``embedded-cluster.worker-environ``."""
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {})
    environ.update(config.get("embedded-cluster.worker-environ") or {})
    return environ
