"""The request stream on tdask's socket (tdask.comm.tcp, Dask's ``tdask://`` comm backend): framing over real
TCP, how it ends, the hello that opens it (tdask.comm.protocol), lending through shared memory, and that callers
of tcp:// workers use it (or Dask comms when configured), with clear errors when it cannot open."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import dask.config
import numpy as np
import pytest
from conftest import SUPPORT
from distributed.comm import CommClosedError, connect, listen
from distributed.protocol import to_serialize

from tdask import ProtocolError
from tdask.comm import protocol
from tdask.comm.stream import accept_stream, open_stream
from tdask.comm.tcp import SMALL, SocketComm, socket_stream_wanted

pytestmark = pytest.mark.timeout(300)


async def _echo(comm: SocketComm) -> None:
    while True:
        try:
            msg = await comm.read()
        except CommClosedError:
            return
        await comm.write(msg)


@contextlib.asynccontextmanager
async def _listening(handle=None, landing=None) -> AsyncIterator[tuple[Any, asyncio.Queue[SocketComm]]]:
    """A ``tdask://`` listener on a free local port (as a worker opens one); the comms it accepts, after Dask's
    handshake, go to ``handle`` or are queued, unread, for the test to use."""
    accepted: asyncio.Queue[SocketComm] = asyncio.Queue()

    async def framing_only(comm: SocketComm) -> None:  # tests of framing skip the hello: keep the comm open
        comm.opened = True
        await (handle or accepted.put)(comm)

    listener = listen("tdask://127.0.0.1:0", framing_only, landing=landing)
    await listener.start()
    try:
        yield listener, accepted
    finally:
        listener.stop()


async def _connect(listener, landing=None) -> SocketComm:
    return await connect(listener.contact_address, timeout=5, landing=landing)


def test_messages_of_every_size_arrive_whole_and_in_order() -> None:
    """Frame sizes around the reused buffer's edge, empty frames, 8 MB tensors and batches, many in flight."""

    async def scenario() -> None:
        async with _listening(_echo) as (listener, _):
            comm = await _connect(listener)
            try:
                await _echoed(comm)
            finally:
                comm.abort()

    async def _echoed(comm: SocketComm) -> None:
        if True:
            sizes = [0, 1, SMALL // 8 - 4, SMALL // 8, SMALL // 8 + 1, 3 * SMALL // 8 + 5, 1_000_000]
            sent = [{"i": i, "x": to_serialize(np.arange(n, dtype=np.int64)), "raw": bytes(n % 7)}
                    for i, n in enumerate(sizes)]

            async def read_all() -> list:
                return [await comm.read() for _ in range(len(sizes) + 1)]  # one reader, like the streams

            reader = asyncio.ensure_future(read_all())
            for msg in sent:  # one after the other, the answers pile up in the stream
                await comm.write(msg)
            await comm.write([{"i": "batch", "x": to_serialize(np.arange(n, dtype=np.int64))} for n in sizes])
            answers = await asyncio.wait_for(reader, 60)
            for n, msg, answer in zip(sizes, sent, answers[:-1], strict=True):
                assert answer["i"] == msg["i"] and answer["raw"] == bytes(n % 7)
                assert np.array_equal(answer["x"], np.arange(n, dtype=np.int64))
            assert [len(a["x"]) for a in answers[-1]] == sizes

    asyncio.run(scenario())


def test_large_frames_are_received_where_the_listener_lands_them_small_ones_never() -> None:
    """A worker lands a caller's large tensors in shared memory: a frame over the reused buffer's size is
    received into the room ``landing`` gives (the array views it: no copy), or its own buffer when none."""
    asked: list[int] = []
    rooms: list[np.ndarray] = []

    async def landing(nbytes: int, lent: bool) -> memoryview | None:
        asked.append(nbytes)
        if nbytes == 3_200_000:  # no room for this one
            return None
        rooms.append(np.empty(nbytes, np.uint8))
        return memoryview(rooms[-1])

    async def scenario() -> None:
      async with _listening(landing=landing) as (listener, accepted):  # noqa: E111
        comm = await _connect(listener)
        try:
            server = await accepted.get()
            rng = np.random.default_rng(3)
            sent = {name: rng.integers(0, 2**62, n, dtype=np.int64)
                    for name, n in (("small", 100), ("edge", SMALL // 8), ("landed", 200_000), ("own", 400_000))}
            _, got = await asyncio.wait_for(
                asyncio.gather(comm.write({k: to_serialize(v) for k, v in sent.items()}), server.read()), 30)
            for name, x in sent.items():
                np.testing.assert_array_equal(got[name], x)
            assert sorted(asked) == [1_600_000, 3_200_000]  # only frames larger than the reused buffer
            assert np.shares_memory(got["landed"], rooms[0])
            assert not any(np.shares_memory(got[name], rooms[0]) for name in ("small", "edge", "own"))
            server.abort()
        finally:
            comm.abort()

    asyncio.run(scenario())


def test_abort_ends_a_pending_read_on_both_sides_and_frees_the_socket() -> None:
    async def scenario() -> None:
        async with _listening() as (listener, accepted):
            comm = await _connect(listener)
            server_side = await asyncio.wait_for(accepted.get(), 10)
            pending = asyncio.ensure_future(comm.read())
            peer_read = asyncio.ensure_future(server_side.read())
            await asyncio.sleep(0.1)
            comm.abort()
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(pending, 5)
            with pytest.raises(CommClosedError, match="closed by the other side"):
                await asyncio.wait_for(peer_read, 5)
            assert comm.closed() and comm.socket.fileno() == -1
            with pytest.raises(CommClosedError):
                await comm.write({"after": "abort"})
            server_side.abort()

    asyncio.run(scenario())


def test_both_ends_drop_a_silent_peer_like_dask_comms_do() -> None:
    """Keepalive probes and TCP_USER_TIMEOUT from distributed.comm.timeouts.tcp, on both sides."""

    async def scenario() -> list[tuple[int, int]]:
        async with _listening() as (listener, accepted):
            comm = await _connect(listener)
            server_side = await asyncio.wait_for(accepted.get(), 10)
            opts = [(c.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                     c.socket.getsockopt(socket.SOL_TCP, 18))  # TCP_USER_TIMEOUT, ms
                    for c in (comm, server_side)]
            comm.abort()
            server_side.abort()
            return opts

    with dask.config.set({"distributed.comm.timeouts.tcp": "45s"}):
        assert asyncio.run(scenario()) == [(1, 45_000), (1, 45_000)]


def test_a_garbage_header_ends_the_stream_instead_of_allocating_it() -> None:
    """Garbage in place of Dask's handshake closes the connection; garbage on an open stream ends it."""

    async def scenario() -> None:
        async with _listening() as (listener, accepted):
            raw = socket.create_connection(("127.0.0.1", listener.port))
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
            raw.settimeout(10)

            def until_closed() -> None:  # the listener's own handshake, then the end of the stream
                while raw.recv(65536):
                    pass

            await asyncio.to_thread(until_closed)  # closed: no stream was ever handed over
            raw.close()
            assert accepted.empty()
            comm = await _connect(listener)
            server_side = await asyncio.wait_for(accepted.get(), 10)
            await asyncio.get_running_loop().sock_sendall(comm.socket, b"GET / HTTP/1.1\r\n\r\n")
            with pytest.raises(CommClosedError, match="malformed"):
                await asyncio.wait_for(server_side.read(), 5)
            comm.abort()

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_batch_the_socket_takes_only_in_part_still_arrives_whole_and_in_order() -> None:
    """A small batch is sent from the writer's own step (no task); when the socket takes only part of it (the
    peer reads nothing yet), the rest goes out before anything else: later batches, which then wait for the
    socket in a task, and this comm's own control messages."""
    from tdask.comm.writer import CoalescingWriter

    async def scenario() -> None:
        async with _listening() as (listener, accepted):
            client = await _connect(listener)
            server = await asyncio.wait_for(accepted.get(), 10)
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            partial = []
            real_try_write = client.try_write

            def watched_try_write(batch):
                out = real_try_write(batch)
                if client.sending:  # the socket took this batch only in part
                    partial.append(batch[0]["i"])
                return out

            client.try_write = watched_try_write
            writer = CoalescingWriter(client)
            payload = np.arange(SMALL // 8 - 64, dtype=np.int64)  # each batch just under the reused buffer
            sent, controls = 0, []
            try:
                while sent < 4000 and (not partial or sent < partial[0] + 20):
                    writer.send({"i": sent, "x": to_serialize(payload + sent)})
                    sent += 1
                    # a whole message written behind the batch: when the batch went only in part, its rest
                    # must go first (that write's task runs before the one made for the rest)
                    controls.append(asyncio.ensure_future(client.write({"i": "between"})))
                    await asyncio.sleep(0)  # the batch leaves at the start of the next iteration
                assert partial, "the socket took every batch whole: the partial send was never made"
                received = []
                while len([m for m in received if m["i"] != "between"]) < sent:  # reading lets the rest out
                    got = await asyncio.wait_for(server.read(), 30)
                    received += list(got) if isinstance(got, (list, tuple)) else [got]
                batches = [m for m in received if m["i"] != "between"]
                for i, msg in enumerate(batches):
                    assert msg["i"] == i and np.array_equal(msg["x"], payload + i), f"message {i} came out wrong"
                await asyncio.wait_for(asyncio.gather(*controls), 10)
                while len(received) - len(batches) < len(controls):  # every write between arrived whole too
                    received.append(await asyncio.wait_for(server.read(), 30))
                assert not client.sending and writer.idle
            finally:
                writer.abort()
                server.abort()

    asyncio.run(scenario())


def test_serve_hands_small_messages_over_from_the_readiness_callback_and_reads_the_rest_itself() -> None:
    """``serve`` parses a message of small frames in the socket's readiness callback (no task runs its
    handler), also one that arrives in pieces or must be moved to the buffer's front to fit; a large frame
    and a control message take :meth:`read` in the serving task; all arrive whole and in order."""

    async def scenario() -> None:
        async with _listening() as (listener, accepted):
            client = await _connect(listener)
            server = await asyncio.wait_for(accepted.get(), 10)
            await client.write({"i": "first"})
            assert await server.read() == {"i": "first"}
            got: list = []
            serving = asyncio.ensure_future(server.serve(lambda msg: got.append((msg, asyncio.current_task()))))
            try:
                # each message arrives while the server waits for the next one (the pauses)
                await client.write({"i": 0, "x": to_serialize(np.arange(100))})
                await asyncio.sleep(0.1)
                await client.write({"i": "large", "x": to_serialize(np.arange(SMALL))})  # a 512 KB frame
                await asyncio.sleep(0.1)
                await client.write([{"i": 1}, {"i": 2, "x": to_serialize(np.arange(10))}])  # a batch
                await asyncio.sleep(0.1)
                client.agree(client.identity())  # both ends lend from now on
                server.agree(server.identity())
                lent = _region()
                await server.write({"x": to_serialize(lent.view(np.int64, [200_000], 0))})
                await asyncio.wait_for(client.read(), 10)  # the client acknowledges the loan: a control message
                await asyncio.sleep(0.1)  # arrives between two messages; the next is handed over again
                # a 30 KB message, then a 48 KB one arriving in pieces: the second no longer fits behind the
                # first in the 64 KiB buffer, so it is moved to the front while its rest is awaited
                pieces = []
                for i, n in ((3, 30_000 // 8), (4, 48_000 // 8)):
                    head, views, _ = client.encode({"i": i, "x": to_serialize(np.arange(n))})
                    pieces.append(b"".join([head, *views]))
                data = b"".join(pieces)
                for at in range(0, len(data), 20_000):
                    assert client.socket.send(data[at:at + 20_000]) == len(data[at:at + 20_000])
                    await asyncio.sleep(0.05)
                await client.write({"i": 5})
                for _ in range(200):
                    if len(got) == 6:
                        break
                    await asyncio.sleep(0.05)
                ids = [m["i"] if isinstance(m, dict) else [x["i"] for x in m] for m, _ in got]
                assert ids == [0, "large", [1, 2], 3, 4, 5]
                assert server.loans == 0  # the serving task read the acknowledgement
                sizes = {0: 100, "large": SMALL, 3: 30_000 // 8, 4: 48_000 // 8}
                for msg, _ in got:
                    if isinstance(msg, dict) and msg["i"] in sizes:
                        assert np.array_equal(msg["x"], np.arange(sizes[msg["i"]])), msg["i"]
                tasks = {str(m["i"]) if isinstance(m, dict) else "batch": t for m, t in got}
                assert tasks["large"] is serving  # read() in the serving task
                assert all(tasks[k] is None for k in ("0", "batch", "3", "4", "5"))  # the readiness callback
            finally:
                client.abort()
                lent.destroy()
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(serving, 10)
            server.abort()

    asyncio.run(scenario())


def test_serve_ends_on_a_malformed_small_message_and_passes_on_its_handlers_error() -> None:
    async def serve_until_it_ends(payload: bytes, handle) -> BaseException:
        async with _listening() as (listener, accepted):
            client = await _connect(listener)
            server = await asyncio.wait_for(accepted.get(), 10)
            serving = asyncio.ensure_future(server.serve(handle))
            client.socket.send(payload)
            try:
                await asyncio.wait_for(serving, 10)
            except BaseException as e:  # noqa: BLE001 - returned for the asserts
                return e
            finally:
                client.abort()
                server.abort()
            raise AssertionError("serve returned")

    garbage = struct.pack("<QQ", 1, 5) + b"\xc1" * 5  # one 5-byte frame that msgpack cannot read
    error = asyncio.run(serve_until_it_ends(garbage, lambda msg: None))
    assert isinstance(error, CommClosedError) and "malformed" in str(error), repr(error)

    def failing(msg):
        raise ValueError(f"handler failed on {msg}")

    from distributed.protocol import dumps

    frames = dumps({"op": "x"})
    message = struct.pack(f"<{len(frames) + 1}Q", len(frames), *map(len, frames)) + b"".join(frames)
    error = asyncio.run(serve_until_it_ends(message, failing))
    assert isinstance(error, ValueError) and "handler failed" in str(error), repr(error)


def test_only_plain_tcp_workers_get_the_socket_stream_and_a_misspelt_setting_is_an_error() -> None:
    from tdask import ConfigError

    assert socket_stream_wanted("tcp://10.0.0.1:8786")
    assert not socket_stream_wanted("tls://10.0.0.1:8786") and not socket_stream_wanted("ucx://10.0.0.1:8786")
    with dask.config.set({"tdask.transfer.request-stream": "dask"}):
        assert not socket_stream_wanted("tcp://10.0.0.1:8786")
    with dask.config.set({"tdask.transfer.request-stream": "sockets"}), \
            pytest.raises(ConfigError, match="must be 'socket' or 'dask', not 'sockets'"):
        socket_stream_wanted("tcp://10.0.0.1:8786")


def _comm_kinds(session) -> set[str]:
    return {type(stream.comm).__name__ for stream in session.pool.streams.values()}


def test_callers_of_tcp_workers_use_the_socket_stream_or_dask_comms_when_configured(loop, client, hello_world):
    import tdask

    async def run(kind: str) -> tuple[set[str], np.ndarray]:
        with dask.config.set({"tdask.transfer.request-stream": kind}):
            async with await tdask.connect(client) as session:
                op = await session.operator("encoder_decoder")
                x = np.arange(5000, dtype=np.int64)
                outs = await asyncio.gather(*(op.infer({"input": x + i}) for i in range(20)))
                for i, out in enumerate(outs):
                    assert np.array_equal(out["output"], x + i)
                return _comm_kinds(session), outs[0]["output"]

    kinds, _ = loop.run(run("socket"))
    assert kinds == {"SocketComm"}
    kinds, _ = loop.run(run("dask"))
    assert kinds == {"TCP"}


def test_a_worker_that_cannot_open_its_socket_is_a_clear_error_not_a_quiet_dask_comm(loop):
    """In-process cluster, so the worker sees the port setting: a port already taken."""
    from distributed import Client, LocalCluster

    import tdask
    from tdask import OperatorConfig, ReplicaUnavailableError

    taken = socket.create_server(("127.0.0.1", 0))
    try:
        async def scenario() -> Exception:
            with dask.config.set({"tdask.transfer.request-stream-port": taken.getsockname()[1]}):
                async with LocalCluster(n_workers=1, processes=False, asynchronous=True, dashboard_address=":0",
                                        protocol="tcp://", host="127.0.0.1") as cluster, \
                        Client(cluster, asynchronous=True) as c:
                    async with tdask.Deployment(c, [OperatorConfig("echo", "sample_operators:Echo",
                                                                   repository=SUPPORT)]):
                        async with await tdask.connect(c) as session:
                            op = await session.operator("echo")
                            try:
                                await asyncio.wait_for(op.infer({"x": np.arange(3)}), 60)
                            except Exception as e:  # noqa: BLE001 - asserted below
                                return e
                            raise AssertionError("the request succeeded without the worker's socket")

        error = loop.run(scenario(), timeout=240)
    finally:
        taken.close()
    assert isinstance(error, ReplicaUnavailableError), repr(error)
    assert "could not open its request-stream socket" in str(error) and "in use" in str(error), str(error)


def test_an_answer_the_caller_dropped_is_not_held_by_its_stream(loop, client, hello_world):
    """The stream's reader must not keep its last batch of answers until the next one arrives: a caller
    that drops a result frees its tensors at once (8 MB outputs would otherwise pile up per stream)."""
    import gc
    import weakref

    import tdask

    async def run() -> bool:
        async with await tdask.connect(client) as session:
            op = await session.operator("encoder_decoder")
            x = np.arange(200_000, dtype=np.int64)
            result = await op.infer({"input": x})
            assert np.array_equal(result["output"], x)
            answer = weakref.ref(result["output"])
            del result
            await asyncio.sleep(0)  # the loop's handle that resumed this coroutine holds the finished request
            gc.collect()
            return answer() is None

    assert loop.run(run())


# -- the hello ------------------------------------------------------------------------------------
def test_a_peer_of_another_protocol_version_is_a_clear_error_naming_both_versions() -> None:
    mine, later = protocol.PROTOCOL_VERSION, protocol.PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match=rf"version 7, this process version {mine}"):
        protocol.check_hello({"op": "hello", "version": 7, "host": b""}, "tcp://10.0.0.1:1")
    with pytest.raises(ProtocolError, match="did not open the request stream with tdask's hello"):
        protocol.check_hello({"op": "infer"}, "tcp://10.0.0.1:1")

    async def scenario() -> None:
        async with _listening() as (listener, accepted):
            client = await _connect(listener)
            server = await asyncio.wait_for(accepted.get(), 10)
            await server.write({**protocol.hello(b""), "version": later})  # a worker of a later tdask
            with pytest.raises(ProtocolError, match=rf"speaks tdask's request-stream protocol version {later}, this "
                                                    rf"process version {mine}"):
                await open_stream(client, 5, "token")
            client.abort()
            server.abort()

    asyncio.run(scenario())


def test_a_caller_without_the_workers_token_is_refused_and_never_told_its_host() -> None:
    """Any peer can reach a worker's socket; only one that read the worker's token from the scheduler is told
    the worker's host identity (which would let it lend the worker frames), and the worker says why it refuses."""

    async def scenario(token: str | None) -> tuple[BaseException | None, BaseException | None, bool]:
        async with _listening() as (listener, accepted):
            client = await _connect(listener)
            server = await asyncio.wait_for(accepted.get(), 10)
            hellos = []
            real_read = client.read

            async def read(*args, **kwargs):  # what the worker's hello said
                msg = await real_read(*args, **kwargs)
                hellos.append(msg)
                return msg

            client.read = read
            opened, accepted_ = await asyncio.gather(open_stream(client, 5, token), accept_stream(server, 5, "secret"),
                                                     return_exceptions=True)
            client.abort()
            server.abort()
            return opened, accepted_, bool(hellos and hellos[0].get("host"))

    opened, accepted_, told = asyncio.run(scenario("guessed"))
    assert isinstance(accepted_, ProtocolError) and "without this worker's token" in str(accepted_)
    assert isinstance(opened, ProtocolError) and "refused the request stream" in str(opened), opened
    assert not told, "the worker named its host to a peer without its token"
    opened, accepted_, told = asyncio.run(scenario("secret"))
    assert opened is None and accepted_ is None and told


def test_every_message_kind_is_in_the_protocols_table() -> None:
    """What the code sends is what the table lists: the op constants and the table are the same set."""
    ops = {value for name, value in vars(protocol).items() if name.isupper() and isinstance(value, str)
           and not name.endswith("HANDLER")}
    assert ops == set(protocol.MESSAGES)


# -- large frames lent through shared memory (tdask.shm.lending) -----------------------------------
def _region(size: int = 2 << 20):
    import os
    import uuid

    from tdask.shm.names import REGION_PREFIX
    from tdask.shm.regions import Region

    return Region(f"{REGION_PREFIX}{os.getpid()}_test{uuid.uuid4().hex[:8]}", size)


async def _pair(listener, accepted, landing=None) -> tuple[SocketComm, SocketComm]:
    """Both ends of one stream, each having read the other's hello."""
    client = await _connect(listener, landing)
    server = await asyncio.wait_for(accepted.get(), 10)
    await asyncio.gather(open_stream(client, 10, "token"), accept_stream(server, 10, "token"))
    return client, server


def test_a_stream_knows_whether_it_may_lend_as_soon_as_it_is_open() -> None:
    """Each end reads the other's hello before anything else, so even the first message may carry loans; an end
    that lends nothing still says hello (an empty one), so opening never waits for a hello that never comes."""

    async def opened() -> tuple[bool, bool]:
        async with _listening() as (listener, accepted):
            client, server = await _pair(listener, accepted)
            shares = client.peer_shares_memory, server.peer_shares_memory
            client.abort()
            server.abort()
            return shares

    assert asyncio.run(opened()) == (True, True)
    with dask.config.set({"tdask.transfer.shared-memory-frames": False}):
        assert asyncio.run(asyncio.wait_for(opened(), 10)) == (False, False)


def test_a_tensor_in_a_shared_memory_region_is_lent_not_sent_and_held_until_acknowledged() -> None:
    from tdask.shm import lending
    from tdask.shm.regions import frame_pool

    async def scenario() -> None:
        region = _region()
        pool = frame_pool()
        async with _listening() as (listener, accepted):
            client, server = await _pair(listener, accepted)
            try:
                assert client.peer_shares_memory and server.peer_shares_memory
                x = region.view(np.int64, [200_000], 64)
                x[:] = np.arange(200_000)
                other = np.arange(200_000, dtype=np.int64) * 3  # 1.6 MB in no region: copied into the frame pool
                small = np.arange(100_000, dtype=np.int64) * 5  # 800 KB: cheaper through the socket than copied
                before, leased = dict(lending.counts), pool.leased_bytes
                wire = await server.write({"x": to_serialize(x), "other": to_serialize(other),
                                           "small": to_serialize(small)})
                assert wire < small.nbytes + 1024  # neither 1.6 MB tensor went through the socket; small did
                assert server.loans == 2  # held until the peer says it has read them
                assert pool.leased_bytes == leased + (2 << 20)  # other's copy, in a 2 MiB region
                got = await asyncio.wait_for(client.read(), 10)
                x[:] = -1  # the receiver has its own copy: the sender may reuse the region
                other[:] = -1
                np.testing.assert_array_equal(got["x"], np.arange(200_000))
                np.testing.assert_array_equal(got["other"], np.arange(200_000) * 3)
                np.testing.assert_array_equal(got["small"], small)
                assert lending.counts["lent"] - before["lent"] == 2
                assert lending.counts["staged"] - before["staged"] == 1
                assert lending.counts["borrowed"] - before["borrowed"] == 2
                reading = asyncio.ensure_future(server.read())  # the ack arrives on the server's reads
                for _ in range(100):
                    if not server.loans:
                        break
                    await asyncio.sleep(0.05)
                assert not server.loans and region.reusable
                assert pool.leased_bytes == leased  # the copy's region is back in the pool
                reading.cancel()
            finally:
                client.abort()
                server.abort()
        region.destroy()

    asyncio.run(scenario())


def test_a_receiver_unmaps_a_peers_regions_when_the_stream_ends_or_the_peer_removes_them() -> None:
    """Mappings of a peer's regions hold that memory: they go with the stream, or once the file is gone."""
    from tdask.shm.mappings import mappings

    async def borrow(region, client: SocketComm, server: SocketComm) -> None:
        reading = asyncio.ensure_future(client.read())
        await server.write({"x": to_serialize(region.view(np.int64, [100_000], 0))})
        await asyncio.wait_for(reading, 10)

    async def scenario() -> None:
        first, second = _region(), _region()
        async with _listening() as (listener, accepted):
            client, server = await _pair(listener, accepted)
            await borrow(first, client, server)
            assert first.name in mappings.mapped()
            client.abort()  # the stream ends: what it borrowed is unmapped here
            server.abort()
            assert first.name not in mappings.mapped()

            client, server = await _pair(listener, accepted)
            await borrow(second, client, server)
            assert second.name in mappings.mapped()
            second.destroy()  # its owner removed it while the stream lives on
            mappings.sweep()
            assert second.name not in mappings.mapped()
            client.abort()
            server.abort()
        first.destroy()

    asyncio.run(scenario())


def test_a_loan_the_peer_never_acknowledged_retires_its_region_when_the_stream_ends() -> None:
    async def scenario() -> None:
        region = _region()
        async with _listening() as (listener, accepted):
            client, server = await _pair(listener, accepted)
            await server.write({"x": to_serialize(region.view(np.int64, [100_000], 0))})
            assert server.loans and region.reusable
            server.abort()  # the client never read it: it may still, so the region must never be reused
            assert not server.loans and not region.reusable
            client.abort()
        region.destroy()

    asyncio.run(scenario())


def test_nothing_is_lent_to_a_peer_on_another_host_or_when_turned_off() -> None:
    async def sent_bytes(fake_identity: bytes | None) -> int:
        region = _region()
        async with _listening() as (listener, accepted):
            client = await _connect(listener)
            server = await asyncio.wait_for(accepted.get(), 10)
            if fake_identity is not None:  # a caller whose hello says it is elsewhere
                await client.write(protocol.hello(fake_identity, token="token"))
                await asyncio.gather(accept_stream(server, 10, "token"), client.read())
            else:
                await asyncio.gather(open_stream(client, 10, "token"), accept_stream(server, 10, "token"))
            x = region.view(np.int64, [100_000], 0)
            x[:] = 7
            reading = asyncio.ensure_future(client.read())
            wire = await server.write({"x": to_serialize(x)})
            np.testing.assert_array_equal((await asyncio.wait_for(reading, 10))["x"], np.full(100_000, 7))
            assert not server.loans
            client.abort()
            server.abort()
        region.destroy()
        return wire

    assert asyncio.run(sent_bytes(b"boot|namespace|elsewhere")) > 800_000
    with dask.config.set({"tdask.transfer.shared-memory-frames": False}):
        assert asyncio.run(sent_bytes(None)) > 800_000


def test_the_frame_pool_reuses_regions_refuses_past_its_limit_and_never_reuses_a_retired_one() -> None:
    import os

    from tdask.shm.regions import FramePool

    with dask.config.set({"tdask.transfer.shared-memory-frames-bytes": 6 << 20,
                          "tdask.transfer.shared-memory-frames-idle-bytes": 4 << 20}):
        pool = FramePool()
        try:
            assert pool.view(1_000_000) is None and pool.refused == 0  # under 1 MiB: the socket is cheaper
            first = pool.view(3_000_000)  # a 4 MiB region
            (region,) = pool.leased()
            assert first is not None and first.nbytes == 3_000_000 and pool.leased_bytes == 4 << 20
            assert pool.view(3_000_000) is None and pool.refused == 1  # 8 MiB would pass the limit
            small = pool.view(1_500_000)  # 2 MiB still fits
            assert small is not None and pool.leased_bytes == 6 << 20
            del first
            assert pool.leased_bytes == 2 << 20 and pool.idle_bytes == 4 << 20  # back when its last view went
            again = pool.view(3_000_000)
            assert again is not None and region in pool.leased()  # the same region, reused
            region.retire()  # as a stream does when it breaks before the peer acknowledged a loan from it
            del again
            assert region.name not in os.listdir("/dev/shm") and pool.idle_bytes == 0  # removed, not kept
            assert pool.view(3_000_000) is not None and region not in pool.leased()
        finally:
            pool.close()
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(pool.prefix)]


def test_the_frame_pool_leaves_no_file_behind_when_its_process_exits() -> None:
    import os
    import subprocess
    import sys

    code = ("from tdask.shm.regions import frame_pool\n"
            "pool = frame_pool()\n"
            "held = pool.view(3_000_000)\n"  # still leased at exit
            "pool.view(2_000_000)\n"  # back in the pool at once: idle at exit
            "assert pool.leased_bytes and pool.idle_bytes\n"
            "print(pool.prefix)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    prefix = done.stdout.strip()
    assert prefix.startswith("tdask_pool_")
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]
    assert "leaked" not in done.stderr, done.stderr  # removed by tdask, not by multiprocessing's tracker


def test_a_tensor_is_sent_through_the_socket_when_the_frame_pool_is_full() -> None:
    from tdask.shm import lending
    from tdask.shm.regions import frame_pool

    async def scenario() -> int:
        pool = frame_pool()
        async with _listening() as (listener, accepted):
            client, server = await _pair(listener, accepted)
            full = dask.config.set({"tdask.transfer.shared-memory-frames-bytes": pool.leased_bytes})  # no room left
            try:
                x = np.arange(200_000, dtype=np.int64)
                before, refused = dict(lending.counts), pool.refused
                wire = await server.write({"x": to_serialize(x)})
                np.testing.assert_array_equal((await asyncio.wait_for(client.read(), 10))["x"], x)
                assert pool.refused == refused + 1 and not server.loans
                assert lending.counts["sent"] - before["sent"] == 1
                assert lending.counts["lent"] == before["lent"]
                return wire
            finally:
                full.__exit__(None, None, None)
                client.abort()
                server.abort()

    assert asyncio.run(scenario()) > 1_600_000  # the tensor's bytes went through the socket


def test_a_relay_maps_a_lent_frame_in_place_lends_it_on_by_the_lenders_name_and_returns_it_when_done() -> None:
    """A -> B -> C, B's landing saying IN_PLACE (a worker that only passes frames on): B maps A's frame
    instead of copying it, C is lent A's region itself, and A gets its frame back only once C has read it and
    B dropped its view. A frame B wrote to is not lent by A's name (A's region does not hold what B sees):
    it is copied and lent from B's frame pool. Past tdask.transfer.mapped-frames-bytes, B copies what it is
    lent into its frame pool and returns it at once."""
    import gc

    from tdask.shm import lending
    from tdask.shm.lending import IN_PLACE
    from tdask.shm.regions import frame_pool

    async def in_place(nbytes: int, lent: bool):
        return IN_PLACE

    async def until(condition, what: str) -> None:
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(what)

    async def scenario() -> None:
        region = _region()
        try:
            async with _listening(landing=in_place) as (relay, relayed), _listening() as (sink, accepted):
                a, b_in = await _pair(relay, relayed)
                b_out, c = await _pair(sink, accepted)
                a_reads = asyncio.ensure_future(a.read())  # A takes its acks on its reads
                b_reads = asyncio.ensure_future(b_out.read())
                try:
                    x = region.view(np.int64, [200_000], 4096 + 8)  # not at a page's start
                    x[:] = np.arange(200_000)
                    before = dict(lending.counts)
                    await a.write({"x": to_serialize(x)})
                    got = (await asyncio.wait_for(b_in.read(), 10))["x"]
                    assert lending.counts["mapped"] - before["mapped"] == 1
                    assert got.flags.writeable and not np.shares_memory(got, x)
                    np.testing.assert_array_equal(got, np.arange(200_000))
                    wire = await b_out.write({"x": to_serialize(got)})
                    assert wire < 1024  # lent on, not sent
                    assert lending.counts["relent"] - before["relent"] == 1
                    assert lending.counts["staged"] == before["staged"]  # and not copied first
                    np.testing.assert_array_equal((await asyncio.wait_for(c.read(), 10))["x"], np.arange(200_000))
                    await until(lambda: not b_out.loans, "C did not acknowledge B's loan")
                    await asyncio.sleep(0.1)
                    assert a.loans == 1  # B still holds a view of A's frame
                    del got
                    gc.collect()
                    await until(lambda: not a.loans, "B did not give A's frame back when its view went")

                    await a.write({"x": to_serialize(x)})
                    got = (await asyncio.wait_for(b_in.read(), 10))["x"]
                    got[0] = -7  # B's own page now: A's region does not hold it
                    before = dict(lending.counts)
                    await b_out.write({"x": to_serialize(got)})
                    assert lending.counts["relent"] == before["relent"]
                    assert lending.counts["staged"] - before["staged"] == 1
                    seen = (await asyncio.wait_for(c.read(), 10))["x"]
                    assert seen[0] == -7 and x[0] == 0
                    np.testing.assert_array_equal(seen[1:], np.arange(1, 200_000))
                    del got
                    gc.collect()
                    await until(lambda: not a.loans, "B did not give A's second frame back")

                    with dask.config.set({"tdask.transfer.mapped-frames-bytes": x.nbytes - 1}):  # over the cap
                        before = dict(lending.counts)
                        await a.write({"x": to_serialize(x)})
                        got = (await asyncio.wait_for(b_in.read(), 10))["x"]
                        assert lending.counts["mapped"] == before["mapped"]  # copied, into B's frame pool
                        found = lending.find(memoryview(got))
                        assert found is not None and found[0].name.startswith(frame_pool().prefix)
                        await until(lambda: not a.loans, "A's frame, copied, was not acknowledged at once")
                        np.testing.assert_array_equal(got, np.arange(200_000))
                finally:
                    a_reads.cancel()
                    b_reads.cancel()
                    for comm in (a, b_in, b_out, c):
                        comm.abort()
        finally:
            region.destroy()

    asyncio.run(scenario())


def test_a_loan_that_names_anything_but_a_tdask_region_ends_the_stream() -> None:
    from tdask.comm.tcp import LENT, LOAN, U64

    async def scenario(name: bytes) -> str:
        async with _listening() as (listener, accepted):
            client, server = await _pair(listener, accepted)
            loan = LOAN.pack(1, 0, 100) + name
            await asyncio.get_running_loop().sock_sendall(client.socket,
                                                          U64.pack(1) + U64.pack(len(loan) | LENT) + loan)
            with pytest.raises(CommClosedError, match="malformed") as info:
                await asyncio.wait_for(server.read(), 10)
            client.abort()
            return str(info.value)

    assert "not a tdask region" in asyncio.run(scenario(b"../../etc/passwd"))
    assert "not a tdask region" in asyncio.run(scenario(b"tdask_pool_1/../../etc/passwd"))
    assert "cannot be read" in asyncio.run(scenario(b"tdask_pool_0_none_such"))


def test_large_tensors_leave_a_worker_through_shared_memory_and_every_loan_is_read(loop, client, hello_world):
    """1.6 MB tensors cross between the caller and the workers, and between workers, as loans: a Triton
    output from its region, any other (the caller's input, a tensor landed on a worker without a Triton
    server) after one copy into the frame pool. None goes through a socket, each loan is borrowed at the
    other end, and the pipeline still returns its input."""
    import tdask
    from tdask.shm import lending

    def counts(dask_worker=None) -> dict[str, int]:
        from tdask.shm import lending

        return dict(lending.counts)

    async def totals() -> dict[str, int]:
        every = [*(await client.run(counts)).values(), lending.counts]
        return {key: sum(c[key] for c in every) for key in lending.counts}

    async def run() -> dict[str, int]:
        before = await totals()
        async with await tdask.connect(client) as session:
            op = await session.operator("encoder_decoder")
            for i in range(6):
                x = np.arange(200_000, dtype=np.int64) + i
                result = await op.infer({"input": x})
                np.testing.assert_array_equal(result["output"], x)
        await asyncio.sleep(0.5)  # the last acknowledgements
        after = await totals()
        return {key: after[key] - before[key] for key in after}

    moved = loop.run(run())
    # at least the caller's input and the answer to the caller, per request; more between workers
    assert moved["lent"] >= 12 and moved["borrowed"] == moved["lent"], moved
    assert moved["staged"] >= 6, moved  # at least each caller input, copied into the caller's frame pool
    assert moved["sent"] == 0, moved
