"""The embedded cluster's own settings reach its scheduler and every worker, also workers added later."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.timeout(180)


def periodic_intervals(dask_worker=None, dask_scheduler=None) -> dict:
    """Milliseconds between runs of the server's periodic callbacks that wake an idle event loop."""
    server = dask_worker or dask_scheduler
    out = {"tick": round(server._tick_interval * 1000)}
    if "profile" in server.periodic_callbacks:
        out["profile"] = round(server.periodic_callbacks["profile"].callback_time)
    return out


def test_dask_config_and_environment_reach_the_scheduler_and_workers_added_later(loop):
    from distributed import Client

    from tdask.deploy.cluster import start_embedded_cluster

    async def scenario() -> dict:
        cluster = await start_embedded_cluster(n_workers=1, scheduler_port=0, dashboard_address=":0")
        try:
            async with Client(cluster.scheduler_address, asynchronous=True) as client:
                cluster.scale(2)  # a worker started after the cluster was made
                await client.wait_for_workers(2, timeout=120)
                return {"workers": await client.run(periodic_intervals),
                        "scheduler": await client.run_on_scheduler(periodic_intervals),
                        "environ": await client.run(os.environ.get, "MALLOC_MMAP_THRESHOLD_")}
        finally:
            await cluster.close()

    out = loop.run(scenario(), timeout=170)
    # tdask.embedded-cluster.dask-config (Dask's defaults: profile 10 ms, tick 20 ms) and worker-environ
    assert list(out["workers"].values()) == [{"profile": 100, "tick": 200}] * 2, out["workers"]
    assert out["scheduler"]["tick"] == 200, out["scheduler"]
    assert list(out["environ"].values()) == ["67108864"] * 2, out["environ"]


def test_dask_config_takes_nested_keys_as_leaves_and_none_as_dasks_own_setting():
    import dask

    from tdask.deploy.cluster import cluster_dask_config

    assert cluster_dask_config() == {"distributed.worker.profile.interval": "100ms",
                                     "distributed.admin.tick.interval": "200ms"}
    # a nested form must set the leaf only: applied as given it would replace all of "distributed"
    nested = {"distributed": {"worker": {"profile": {"interval": "50ms"}}, "admin": {"tick": {"interval": None}}}}
    with dask.config.set({"tdask.embedded-cluster.dask-config": nested}):
        assert cluster_dask_config() == {"distributed.worker.profile.interval": "50ms"}
    with dask.config.set({"tdask.embedded-cluster.dask-config.distributed.admin.tick.interval": None}):
        assert cluster_dask_config() == {"distributed.worker.profile.interval": "100ms"}
