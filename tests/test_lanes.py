"""Lanes (:mod:`tdask.worker.lanes`): in deploy's layout, encoder_decoder's worker runs small encoder and decoder
requests on their replicas' Triton servers itself, on slots the replicas lend it and ask back."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from conftest import MODELS, OPERATORS, triton_successes

pytestmark = pytest.mark.timeout(400)


def service_stats(dask_worker: Any = None) -> dict:
    return dask_worker.extensions["tdask"].stats()


@pytest.mark.slow
def test_lanes_run_small_requests_from_the_callers_worker_within_the_replicas_slots(loop):
    """Pipeline requests at concurrency 8 on three workers, the encoder lending at most 2 slots:
    - every answer is right, and Triton ran each model exactly once per request;
    - encoder_decoder's worker ran some of them on lanes, and the replicas counted exactly what it ran;
    - a replica never had more requests running and slots lent than its max in-flight;
    - a client's own requests to the encoder, sent while lanes held both its slots, were answered while
      the load still ran: the encoder asked slots back;
    - once the load stops, every lent slot goes back."""
    from distributed import Client

    import tdask
    from tdask import Deployment, OperatorConfig
    from tdask.deploy.cluster import start_embedded_cluster

    configs = [
        OperatorConfig("encoder", repository=MODELS, max_inflight=2),
        OperatorConfig("decoder", repository=MODELS, max_inflight=4),
        OperatorConfig("encoder_decoder", "encoder_decoder:EncoderDecoder", repository=OPERATORS, max_inflight=16),
    ]

    async def scenario() -> dict:
        cluster = await start_embedded_cluster(n_workers=3, scheduler_port=0, dashboard_address=":0")
        try:
            async with Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True) as client:
                async with Deployment(client, configs, supervise=False) as deployment:
                    infos = deployment.replicas
                    where = {i["name"]: i["worker"] for i in infos}
                    assert len(set(where.values())) == 3, where
                    before = [await triton_successes(infos, op) for op in ("encoder", "decoder")]
                    async with await tdask.connect(client) as session:
                        pipeline = await session.operator("encoder_decoder")
                        encoder = await session.operator("encoder")
                        rng = np.random.default_rng(1)
                        wrong, peaks, direct, sent = [], [], [], []
                        others_done = asyncio.Event()

                        async def drive() -> None:
                            while not others_done.is_set() or len(sent) < 200:
                                x = rng.integers(-2**40, 2**40, size=int(rng.integers(0, 2000)))
                                sent.append(1)
                                r = await pipeline.infer({"input": x}, {"input_copies": 1 + len(sent) % 3})
                                if not np.array_equal(r["output"], x):
                                    wrong.append(x)

                        async def encoder_stats() -> dict:
                            st = (await client.run(service_stats, workers=[where["encoder"]]))[where["encoder"]]
                            (r,) = st["replicas"].values()
                            return r

                        async def watch() -> None:
                            while not others_done.is_set():
                                r = await encoder_stats()
                                peaks.append((r["inflight"] + r["leased"], r["max_inflight"]))
                                await asyncio.sleep(0.05)

                        async def another_caller() -> None:
                            try:
                                while (await encoder_stats())["leased"] < 2:  # lanes hold both slots
                                    await asyncio.sleep(0.05)
                                for i in range(10):
                                    x = np.arange(i + 1)
                                    r = await encoder.infer({"input": x}, timeout=30)
                                    direct.append(np.array_equal(r["output"], ~x))
                            finally:
                                others_done.set()

                        watcher = asyncio.ensure_future(watch())
                        await asyncio.gather(*(drive() for _ in range(8)), another_caller())
                        await watcher
                        ran = [await triton_successes(infos, op) - b
                               for op, b in zip(("encoder", "decoder"), before, strict=True)]
                        n = len(sent)
                        # the replicas count what lanes ran when they report or give their slots back
                        for _ in range(100):
                            stats = await client.run(service_stats)
                            replicas = {r["name"]: r for st in stats.values() for r in st["replicas"].values()}
                            if all(replicas[op]["completed"] == n + 10 * (op == "encoder")
                                   and not replicas[op]["leased"] for op in ("encoder", "decoder")):
                                break
                            await asyncio.sleep(0.1)
                        return {"wrong": wrong, "ran": ran, "n": n, "peaks": peaks, "direct": direct,
                                "stats": stats, "replicas": replicas, "where": where}
        finally:
            await cluster.close()

    out = loop.run(scenario(), timeout=300)
    n = out["n"]
    assert out["wrong"] == []
    assert out["ran"] == [n + 10, n], (out["ran"], n)  # the pipeline's requests, and the client's 10 to the encoder
    assert out["peaks"] and all(used <= limit for used, limit in out["peaks"]), out["peaks"]
    assert out["direct"] == [True] * 10, out["direct"]
    replicas, lanes = out["replicas"], out["stats"][out["where"]["encoder_decoder"]]["lanes"]
    for op in ("encoder", "decoder"):
        r = replicas[op]
        assert r["completed"] == n + 10 * (op == "encoder") and r["failed"] == 0, r
        assert r["leased"] == 0, r
        assert 0 < r["on_lanes"] < n, r  # some on lanes, the rest (the first, the overflow) sent to the replica
        assert lanes["ran"][r["replica"]] == r["on_lanes"], (lanes, r)
    assert replicas["encoder"]["revoked"] > 0, replicas["encoder"]
    assert not lanes["held"], lanes


@pytest.mark.slow
def test_with_deploys_defaults_no_request_waits_for_a_slot_a_lane_holds_idle(loop):
    """deploy's defaults (max in-flight 1 everywhere, a worker per operator), lanes keeping idle slots for an
    hour: a request that must wait at a replica gets the slot a lane holds only because the replica asks
    for it back and the lane gives it. 40 pipeline requests and 10 to the encoder, all at once, each with a
    60 s timeout: all answered, right, with Triton running each model once per request."""
    import dask.config
    from distributed import Client

    import tdask
    from tdask import Deployment, OperatorConfig
    from tdask.deploy.cluster import start_embedded_cluster

    configs = [OperatorConfig("encoder", repository=MODELS), OperatorConfig("decoder", repository=MODELS),
               OperatorConfig("encoder_decoder", "encoder_decoder:EncoderDecoder", repository=OPERATORS)]

    async def scenario() -> tuple[list, list, dict]:
        with dask.config.set({"tdask.lanes.idle-timeout": "1h"}):  # the workers take the caller's config
            cluster = await start_embedded_cluster(n_workers=3, scheduler_port=0, dashboard_address=":0")
        try:
            async with Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True) as client:
                async with Deployment(client, configs, supervise=False) as deployment:
                    infos = deployment.replicas
                    before = [await triton_successes(infos, op) for op in ("encoder", "decoder")]
                    async with await tdask.connect(client) as session:
                        pipeline = await session.operator("encoder_decoder")
                        encoder = await session.operator("encoder")
                        xs = [np.arange(i * 10) for i in range(50)]
                        calls = [pipeline.infer({"input": x}, timeout=60) for x in xs[:40]]
                        calls += [encoder.infer({"input": x}, timeout=60) for x in xs[40:]]
                        results = await asyncio.gather(*calls, return_exceptions=True)
                    ran = [await triton_successes(infos, op) - b for op, b in zip(("encoder", "decoder"),
                                                                                   before, strict=True)]
                    stats = await client.run(service_stats)
                    lanes = {k: v for st in stats.values() for k, v in st["lanes"].get("ran", {}).items()}
                    return results, ran, lanes
        finally:
            await cluster.close()

    results, ran, lanes = loop.run(scenario(), timeout=300)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors[:3]
    assert all(np.array_equal(r["output"], np.arange(i * 10)) for i, r in enumerate(results[:40]))
    assert all(np.array_equal(r["output"], ~np.arange(i * 10)) for i, r in enumerate(results[40:], 40))
    assert ran == [50, 40], ran
    assert sum(lanes.values()) > 0, lanes  # lanes took part (and held their slots between requests)


def test_lanes_take_only_small_numpy_requests_to_cpu_triton_replicas_of_other_processes_on_this_host():
    from tdask.worker.lanes import Lanes

    class Session:
        class pool:  # noqa: N801 - a stand-in with the one attribute Lanes sets
            listener = None

    import dask.config

    lanes = Lanes(Session(), "tcp://127.0.0.1:1")
    assert lanes.fits({"input": np.zeros(100, np.int64)})
    assert not lanes.fits({"input": np.zeros(2**13, np.int64)})  # 64 KiB: the shared-memory threshold
    assert not lanes.fits({"input": np.array(["a"], dtype=object)})
    assert lanes.reaches("tcp://127.0.0.1:2") and not lanes.reaches("tcp://127.0.0.1:1")
    assert not lanes.reaches("tcp://10.1.2.3:2") and not lanes.reaches("tls://127.0.0.1:2")
    workers = [{"worker": w} for w in ("tcp://127.0.0.1:2", "tcp://127.0.0.1:1", "tcp://10.1.2.3:2")]

    def lane_workers(implementation: str, device: str) -> set[str]:
        return lanes.workers({"config": {"implementation": implementation, "device": device}, "replicas": workers})

    assert lane_workers("TritonCoreOperator", "CPU") == {"tcp://127.0.0.1:2"}
    assert lane_workers("TritonCoreOperator", "GPU") == set()
    assert lane_workers("encoder_decoder:EncoderDecoder", "CPU") == set()
    with dask.config.set({"tdask.lanes.enabled": False}):
        assert lane_workers("TritonCoreOperator", "CPU") == set()


class _Stream:
    def __init__(self, sent: list, answer: Any = None) -> None:
        self.sent = sent
        self.answer = answer

    def send(self, msg: dict) -> None:
        self.sent.append(msg)

    async def call(self, msg: dict) -> dict:
        self.sent.append(msg)
        return self.answer(msg)


_LANE = {"model": "encoder", "server": 1, "grpc": "127.0.0.1:3", "http": "127.0.0.1:4"}


def _lanes(answer: Any = None) -> tuple[Any, list]:
    from tdask.worker.lanes import Lanes

    sent: list = []

    class Pool:
        listener = None

        def get(self, address: str) -> _Stream:
            return _Stream(sent, answer)

    class Session:
        pool = Pool()

    return Lanes(Session(), "tcp://127.0.0.1:1"), sent


async def _lanes_with_slots(held: int) -> tuple[Any, Any, list]:
    """Lanes holding ``held`` free slots of replica enc-1, lent in one answer to an ask."""
    lanes, sent = _lanes(lambda msg: {"granted": held, "lane": _LANE, "id": 0})
    lane = await lanes.ask("enc-1", "tcp://127.0.0.1:2")  # takes one of them for a request
    lanes.done(lane, None, 0.0)  # which never ran: the slot is free again, nothing counted
    sent.clear()
    return lanes, lane, sent


def test_a_revoked_lane_returns_idle_slots_at_once_and_busy_ones_as_they_finish():
    async def main() -> None:
        lanes, lane, sent = await _lanes_with_slots(3)
        a = lanes.take("enc-1")
        b = lanes.take("enc-1")
        assert a is lane and b is lane and lane.free == 1
        lanes.pushed(lane.worker, {"op": "revoke", "replica": "enc-1", "slots": 2})
        assert [m["slots"] for m in sent] == [1] and lane.held == 2 and lane.owed == 1 and lane.free == 0
        assert lanes.take("enc-1") is None  # owed slots are not used again
        lanes.done(lane, True, 0.001)
        assert [m["slots"] for m in sent] == [1, 1] and lane.held == 1 and lane.owed == 0
        assert sent[1]["report"]["completed"] == 1  # what it ran is counted by the replica
        lanes.done(lane, False, 0.001)
        assert lane.held == 1 and lane.free == 1  # kept: not asked back
        lanes.lost(lane.worker)  # the stream ended: the replica took everything back itself
        assert lanes.stats()["held"] == {} and len(sent) == 2
        assert lanes.stats()["ran"] == {"enc-1": 2}
        await lanes.close()

    asyncio.run(main())


def test_a_broken_lane_gives_every_slot_back_and_still_reports_what_ran():
    async def main() -> None:
        lanes, lane, sent = await _lanes_with_slots(2)
        assert lanes.take("enc-1") is lane
        lanes.broken(lane)
        assert sent == [{"op": "lease-return", "replica": "enc-1", "slots": 2, "report": None}]
        lanes.done(lane, False, 0.01)  # the request that met the broken server
        assert sent[1]["op"] == "lease-report" and sent[1]["report"]["failed"] == 1
        await lanes.close()

    asyncio.run(main())


def test_replica_slots_are_lent_only_when_no_request_waits_and_a_waiter_gets_a_returned_one():
    from tdask.worker.replica import Slots

    async def main() -> None:
        slots = Slots(2)
        assert slots.take_nowait() and slots.take_nowait() and not slots.take_nowait()
        waiter = asyncio.ensure_future(slots.take())
        await asyncio.sleep(0)
        assert slots.waiting == 1
        slots.give()
        assert not slots.take_nowait(), "a returned slot goes to the request waiting for it"
        await waiter
        cancelled = asyncio.ensure_future(slots.take())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        slots.give(2)
        assert slots.free == 2 and slots.waiting == 0

    asyncio.run(main())


def test_slots_asked_back_before_the_grant_is_read_are_given_back_with_it():
    """The replica lends a slot, then a request of another caller waits there and it asks the slot back:
    both messages may arrive in one read, the revocation handled before the grant's answer is. The slot
    goes back at once instead of sitting idle while that request waits."""
    async def main() -> None:
        def answer(msg: dict) -> dict:
            lanes.pushed("tcp://127.0.0.1:2", {"op": "revoke", "replica": "enc-1", "slots": 1})
            return {"granted": 1, "lane": _LANE, "id": 0}

        lanes, sent = _lanes(answer)
        assert await lanes.ask("enc-1", "tcp://127.0.0.1:2") is None  # the request goes to the replica
        assert [m["op"] for m in sent] == ["lease", "lease-return"] and sent[1]["slots"] == 1
        assert lanes.stats()["held"] == {}
        await lanes.close()

    asyncio.run(main())
