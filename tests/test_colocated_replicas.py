"""Replicas of one Triton operator on one worker share that worker's server and add up its instances."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from conftest import MODELS, OPERATORS

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


async def instance_count(grpc_url: str, model: str) -> int:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        config = (await client.get_model_config(model, as_json=True))["config"]
    finally:
        await client.close()
    return sum(int(group.get("count", 1)) for group in config.get("instance_group", []))


def shared_memory_state(dask_worker) -> dict:
    stats = dask_worker.extensions["tdask"].stats()
    (server,) = stats["triton"]  # one server, whose client its models share
    return {"in_place": server["shm"]["inputs_in_place"], "kept": stats["store"]["tensors"],
            "leased": server["shm"]["leased_regions"]}


def test_colocated_replicas_sum_instances_and_conflicting_configs_are_refused(loop):
    from distributed import Client

    import tdask
    from tdask import Deployment, OperatorConfig, PlacementError
    from tdask.deploy.cluster import start_embedded_cluster

    async def scenario() -> dict:
        cluster = await start_embedded_cluster(n_workers=1, scheduler_port=0, dashboard_address=":0")
        out: dict = {}
        try:
            async with Client(cluster.scheduler_address, asynchronous=True) as client:
                encoder = OperatorConfig("encoder", repository=MODELS, replicas=3, instances=2, max_inflight=4)
                deployment = Deployment(client, [
                    encoder,
                    OperatorConfig("decoder", repository=MODELS, max_inflight=4),
                    OperatorConfig("encoder_decoder", "encoder_decoder:EncoderDecoder", repository=OPERATORS,
                                   max_inflight=8),
                ], supervise=False)  # the test takes a replica away itself
                infos = await deployment.start()
                try:
                    grpc = {i["triton_grpc"] for i in infos if i["name"] == "encoder"}
                    out["servers"] = len(grpc)
                    out["environ"] = await client.run(os.environ.get, "MALLOC_MMAP_THRESHOLD_")
                    out["instances_3"] = await instance_count(grpc.pop(), "encoder")
                    # another version of the model with other parameters cannot share the loaded one
                    other = Deployment(client, [OperatorConfig("encoder", repository=MODELS, version=2,
                                                               parameters={"input_copies": 5})], supervise=False)
                    try:
                        await other.start()
                        out["conflict"] = None
                    except PlacementError as e:
                        out["conflict"] = str(e)
                    session = await tdask.connect(client)
                    pipeline = await session.operator("encoder_decoder")
                    xs = [np.arange(n, dtype=np.int64) for n in range(1, 41)]
                    results = [await f for f in [pipeline.infer({"input": x}) for x in xs]]
                    out["correct"] = all(np.array_equal(r["output"], x) for r, x in zip(results, xs, strict=True))
                    # large tensors: encoder -> decoder in one worker, through its server's shared memory
                    # the first large request learns the output sizes (its outputs come back in the message)
                    await pipeline.infer({"input": np.arange(300_000, dtype=np.int64)})
                    before = (await client.run(shared_memory_state)).popitem()[1]
                    big = [np.arange(n, n + 300_000, dtype=np.int64) for n in range(4)]
                    results = [await f for f in [pipeline.infer({"input": x}) for x in big]]
                    out["big_correct"] = all(np.array_equal(r["output"], x) for r, x in zip(results, big, strict=True))
                    del results
                    # the worker releases what it kept once the answers are sent (not at the store's 600 s TTL):
                    # polled for up to 10 s, as a loaded machine may take a moment
                    for _ in range(50):
                        await asyncio.sleep(0.2)
                        out["after"] = (await client.run(shared_memory_state)).popitem()[1]
                        if out["after"]["kept"] == 0 and out["after"]["leased"] == 0:
                            break
                    out["before"] = before
                    await session.close()
                    # a replica leaving gives its instances back
                    rid = next(i["replica"] for i in deployment.replicas if i["name"] == "encoder")
                    await deployment.stop_replica(rid)
                    out["instances_2"] = await instance_count(infos[0]["triton_grpc"], "encoder")
                finally:
                    await deployment.stop()
        finally:
            await cluster.close()
        return out

    out = loop.run(scenario(), timeout=380)
    assert out["servers"] == 1
    assert list(out["environ"].values()) == ["67108864"]  # the embedded cluster's worker-environ
    assert out["instances_3"] == 6
    assert out["conflict"] is not None and "different configuration" in out["conflict"], out["conflict"]
    assert out["correct"]
    assert out["instances_2"] == 4
    # no large input was copied into a region, and nothing stays held afterwards
    assert out["big_correct"]
    # each encoder input was received from the caller into a region, each decoder input is an encoder output
    assert out["after"]["in_place"] - out["before"]["in_place"] == 8
    assert out["after"]["kept"] == 0, out["after"]
    assert out["after"]["leased"] == 0, out["after"]
