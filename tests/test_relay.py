"""``python -m deploy``'s own layout (one worker each for encoder, decoder and encoder_decoder): large tensors
pass through encoder_decoder's worker, which has no Triton server, without a copy there."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import hello_world_configs

pytestmark = pytest.mark.timeout(400)


def relay_state(dask_worker=None) -> dict:
    from tdask import shm_frames
    from tdask.shm_regions import frame_pool

    service = dask_worker.extensions["tdask"]
    return {"counts": dict(shm_frames.counts), "triton": len(service._triton_clients),
            "borrowed_now": sum(isinstance(r, shm_frames.Borrowed) for r in tuple(shm_frames._regions)),
            "pool_leased": frame_pool().leased_bytes,
            "triton_leased": sum(region.leased for client in service._triton_clients.values()
                                 for region in (client._pool.all if client._pool is not None else ())),
            "from_peers": sum(client.shm_inputs_from_peers for client in service._triton_clients.values())}


async def triton_successes(infos: list[dict], operator: str) -> int:
    import tritonclient.grpc.aio as grpcclient

    (url,) = {i["triton_grpc"] for i in infos if i["name"] == operator}
    c = grpcclient.InferenceServerClient(url)
    try:
        stats = await c.get_inference_statistics(operator, as_json=True)
    finally:
        await c.close()
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats.get("model_stats", []))


def test_a_python_operator_alone_on_its_worker_relays_large_tensors_without_copying_them(loop):
    """encoder_decoder's worker maps the caller's input and the decoder's answer where they lie and lends
    them on by their owners' names: every 1.6 MB tensor of six requests is mapped there and lent on, none is
    copied into its frame pool; Triton ran each model exactly six times; and once the answers are in, every
    loan came back (no region of any process is still leased, nothing is still mapped)."""
    from distributed import Client

    import tdask
    from tdask import Deployment
    from tdask.cluster import start_embedded_cluster
    from tdask.shm_regions import frame_pool

    async def scenario() -> tuple[dict, dict, dict, int, list[int]]:
        cluster = await start_embedded_cluster(n_workers=3, scheduler_port=0, dashboard_address=":0")
        try:
            async with Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True) as client:
                deployment = Deployment(client, hello_world_configs(encoder_replicas=1), supervise=False)
                infos = await deployment.start()
                try:
                    where = {i["name"]: i["worker"] for i in infos}
                    assert len(set(where.values())) == 3, where  # one worker each, as deploy places them
                    before = await client.run(relay_state)
                    ops = ("encoder", "decoder")
                    runs = [await triton_successes(infos, op) for op in ops]
                    async with await tdask.connect(client) as session:
                        op = await session.operator("encoder_decoder")
                        for i in range(6):
                            x = np.arange(200_000, dtype=np.int64) * (i + 1)
                            result = await op.infer({"input": x})
                            np.testing.assert_array_equal(result["output"], x)
                        del result
                        await asyncio.sleep(0.5)  # the last acknowledgements
                        after = await client.run(relay_state)
                    runs = [await triton_successes(infos, op) - n for op, n in zip(ops, runs, strict=True)]
                    return before, after, where, frame_pool().leased_bytes, runs
                finally:
                    await deployment.stop()
        finally:
            await cluster.close()

    before_all, every, where, caller_leased, runs = loop.run(scenario(), timeout=300)
    before, after = before_all[where["encoder_decoder"]], every[where["encoder_decoder"]]
    moved = {key: after["counts"][key] - before["counts"][key] for key in after["counts"]}
    assert after["triton"] == 0  # the relay's worker serves no Triton model
    assert moved["mapped"] == 12 and moved["borrowed"] == 12, moved  # the input, the decoder's answer
    assert moved["relent"] == 12 and moved["lent"] == 12, moved  # on to the encoder, back to the caller
    assert moved["staged"] == 0 and moved["sent"] == 0, moved  # no copy, nothing through the socket
    assert runs == [6, 6]
    assert after["borrowed_now"] == 0  # each mapping went with its last view, and its loan was returned
    assert all(s["pool_leased"] == 0 and s["triton_leased"] == 0 for s in every.values()), every
    assert caller_leased == 0
    # the encoder's Triton read each caller's input from the caller's region, the decoder's each encoder output
    # from the encoder worker's: the two workers mapped them, neither copied one
    for op in ("encoder", "decoder"):
        w = where[op]
        counts = {key: every[w]["counts"][key] - before_all[w]["counts"][key] for key in every[w]["counts"]}
        assert counts["mapped"] == 6 and counts["borrowed"] == 6, (op, counts)
        assert every[w]["from_peers"] - before_all[w]["from_peers"] == 6, op
