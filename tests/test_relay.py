"""``python -m deploy``'s own layout (one worker each for encoder, decoder and encoder_decoder): large tensors
pass through encoder_decoder's worker, which has no Triton server, without a copy there."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import hello_world_configs, triton_successes

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


def relay_state(dask_worker=None) -> dict:
    from tdask.shm import lending
    from tdask.shm.mappings import Borrowed
    from tdask.shm.regions import frame_pool

    triton = [server["shm"] for server in dask_worker.extensions["tdask"].stats()["triton"]]
    return {"counts": dict(lending.counts), "triton": len(triton),
            "borrowed_now": sum(isinstance(r, Borrowed) for r in lending.regions()),
            "pool_leased": frame_pool().leased_bytes,
            "triton_leased": sum(shm.get("leased_regions", 0) for shm in triton),
            "from_peers": sum(shm.get("inputs_from_peers", 0) for shm in triton)}


def test_deploys_layout_moves_large_tensors_with_no_copy_in_any_worker_and_returns_every_loan(loop):
    """Six 1.6 MB requests through encoder_decoder in deploy's layout. encoder_decoder's worker (no Triton
    server) maps the caller's input and the decoder's answer where they lie and lends them on by their
    owners' names; the encoder's and the decoder's Triton servers read their inputs from the lenders' regions;
    the caller maps its answers too. No worker copies a tensor, and Triton ran each model exactly six times.
    While the caller holds its answers, the decoder's regions that hold them stay taken; once it drops
    them, every loan comes back: no region of any process is leased, nothing is mapped."""
    from distributed import Client

    import tdask
    from tdask import Deployment
    from tdask.deploy.cluster import start_embedded_cluster
    from tdask.shm import lending
    from tdask.shm.mappings import mappings
    from tdask.shm.regions import frame_pool

    async def scenario() -> dict:
        cluster = await start_embedded_cluster(n_workers=3, scheduler_port=0, dashboard_address=":0")
        try:
            async with Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True) as client:
                deployment = Deployment(client, hello_world_configs(encoder_replicas=1), supervise=False)
                infos = await deployment.start()
                try:
                    out: dict = {"where": {i["name"]: i["worker"] for i in infos}}
                    out["before"] = await client.run(relay_state)
                    caller_before = dict(lending.counts)
                    ops = ("encoder", "decoder")
                    runs = [await triton_successes(infos, op) for op in ops]
                    async with await tdask.connect(client) as session:
                        op = await session.operator("encoder_decoder")
                        held = []
                        for i in range(6):
                            x = np.arange(200_000, dtype=np.int64) * (i + 1)
                            held.append((await op.infer({"input": x}))["output"])
                            np.testing.assert_array_equal(held[-1], x)
                        await asyncio.sleep(0.5)
                        out["holding"] = await client.run(relay_state)
                        out["caller_mapped"] = lending.counts["mapped"] - caller_before["mapped"]
                        out["caller_holds"] = mappings.borrowed_bytes
                        del held
                        await asyncio.sleep(0.5)  # the last acknowledgements
                        out["after"] = await client.run(relay_state)
                    out["runs"] = [await triton_successes(infos, op) - n for op, n in zip(ops, runs, strict=True)]
                    out["caller_leased"] = frame_pool().leased_bytes
                    out["caller_held_after"] = mappings.borrowed_bytes
                    return out
                finally:
                    await deployment.stop()
        finally:
            await cluster.close()

    out = loop.run(scenario(), timeout=300)
    where, before, after = out["where"], out["before"], out["after"]
    assert len(set(where.values())) == 3, where  # one worker each, as deploy places them
    assert out["runs"] == [6, 6]

    def moved(op: str) -> dict:
        w = where[op]
        return {key: after[w]["counts"][key] - before[w]["counts"][key] for key in after[w]["counts"]}

    relay = moved("encoder_decoder")
    assert after[where["encoder_decoder"]]["triton"] == 0  # the relay's worker serves no Triton model
    assert relay["mapped"] == 12 and relay["borrowed"] == 12, relay  # the input, the decoder's answer
    assert relay["relent"] == 12 and relay["lent"] == 12, relay  # on to the encoder, back to the caller
    assert relay["staged"] == 0 and relay["sent"] == 0, relay  # no copy, nothing through the socket
    for op in ("encoder", "decoder"):  # the caller's input, the encoder's output: read where they lie
        counts = moved(op)
        assert counts["mapped"] == 6 and counts["borrowed"] == 6, (op, counts)
        assert after[where[op]]["from_peers"] - before[where[op]]["from_peers"] == 6, op
    assert out["caller_mapped"] == 6 and out["caller_holds"] >= 6 * 1_600_000
    # each answer the caller holds keeps the decoder's region that holds it taken: five Triton regions, and
    # for the first (its size not known yet, it came in Triton's message) a 2 MiB region of the frame pool
    holding = out["holding"][where["decoder"]]
    assert holding["triton_leased"] == 5 and holding["pool_leased"] == 2 << 20, holding
    assert all(s["borrowed_now"] == 0 for s in after.values()), after  # each mapping went with its last view
    assert all(s["pool_leased"] == 0 and s["triton_leased"] == 0 for s in after.values()), after
    assert out["caller_leased"] == 0 and out["caller_held_after"] == 0
