"""A thin async client for the models of one Triton server.

Small tensors travel in HTTP requests on keep-alive connections driven by the event loop itself
(:mod:`tdask.triton.http`). Tensors of ``tdask.triton.shared-memory-threshold`` bytes or more move through
Triton's system shared-memory extension instead, named in the same HTTP requests: inputs are copied once
into a pooled ``/dev/shm`` region registered with the server (:mod:`tdask.shm.regions`) and Triton writes
the outputs into the same region, which avoids the copies of sending them. gRPC (tritonclient) only
registers regions and reads model metadata. Outputs are handed out as views of the region, not copies; the
region goes back to the pool when the last of them is gone, and an output passed as the next model's input
on the same server is referenced where it lies (encoder -> decoder moves no tensor bytes at all). A worker
receives a caller's large tensor straight into a region too (:meth:`TritonModelClient.landing`), so it is
not copied at all, and a tensor another process lent is read from the lender's region
(:mod:`tdask.triton.peers`).

A variable-size output's region is sized from what earlier calls of the model with the same request
parameters returned; the first such call gets its outputs in the message. Triton only finds out that an
output does not fit after the model ran, so a call that overflows its region is run again (outputs in
the message) only for idempotent operators; any other gets an explicit error, never a second run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import (
    InferenceServerException,
    np_to_triton_dtype,
)

from tdask import config
from tdask.errors import InvalidRequestError, TritonError
from tdask.shm.names import SHM_DIR
from tdask.shm.regions import Region, RegionPool, size_class
from tdask.triton.http import InputRegion, OutputRegion, TritonHttp, triton_error
from tdask.triton.peers import PeerRegions
from tdask.triton.streaming import TritonStreams

logger = logging.getLogger(__name__)

_ALIGN = 64


def _triton_error(model: str, exc: InferenceServerException) -> TritonError:
    return triton_error(model, exc.message(), exc.status())


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _shm_bytes(typed: list[tuple[str, str, np.ndarray]]) -> int | None:
    """The inputs' bytes where they go through Triton's shared memory (``tdask.triton.shared-memory-threshold``
    or more, no BYTES tensor), else None."""
    threshold = int(config.get("triton.shared-memory-threshold") or 0)
    if threshold <= 0 or any(datatype == "BYTES" for _, datatype, _ in typed):
        return None
    size = sum(array.nbytes for _, _, array in typed)
    return size if size >= threshold else None


def _view(lease: Any, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A view of a region, not a copy: it keeps the region leased while it lives."""
    return np.frombuffer(lease, dtype, int(np.prod(shape, dtype=np.int64)), offset).reshape(shape)


class TritonModelClient:
    """Async inference against one Triton server, given its gRPC ``host:port`` and HTTP URL."""

    def __init__(self, url: str, http_url: str) -> None:
        self.url = url
        self._client: grpcclient.InferenceServerClient | None = None
        self._http = TritonHttp(http_url)
        self.pool: RegionPool | None = None  # its shared-memory regions, made on first use
        self._registered: set[str] = set()  # regions of the pool registered with the server
        self._unregistering: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metadata: dict[str, Any] = {}
        # (model, version, parameters) -> largest output/input byte ratio seen; a few hundred kept
        self._ratio: dict[tuple[str, str, str], float] = {}
        self.shm_calls = 0
        self.shm_inputs_in_place = 0  # inputs that were already in a region of this server: not copied
        self.shm_inputs_from_peers = 0  # of those, inputs read where another process lent them from
        self._peers: PeerRegions | None = None
        self.streams = TritonStreams(url)  # streamed requests to decoupled models

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        # Created lazily so it binds to the event loop that first uses it.
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    @staticmethod
    def _check(name: str, array: Any) -> str:
        if not isinstance(array, np.ndarray):
            raise InvalidRequestError(
                f"input {name!r} must be a numpy.ndarray, got {type(array).__name__}"
            )
        datatype = np_to_triton_dtype(array.dtype)
        if datatype is None or (datatype == "BYTES" and array.dtype.kind not in "OSU"):
            raise InvalidRequestError(f"input {name!r} has unsupported dtype {array.dtype}")
        return datatype

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        parameters: dict | None = None,
        request_id: str = "",
        outputs: list[str] | None = None,
        model_version: str = "",
        idempotent: bool = False,
    ) -> dict[str, np.ndarray]:
        """Run one request; return every output (or the named ones) as numpy arrays.

        ``idempotent``: the model may run a second time when a large output overflowed its region.
        """
        typed = [(name, self._check(name, array), array) for name, array in inputs.items()]
        size = _shm_bytes(typed)
        if size is not None:
            shm_outputs = await self._shm_outputs(model, model_version, outputs)
            if shm_outputs is not None:
                return await self._infer_shm(model, typed, size, shm_outputs, parameters, request_id,
                                             model_version, idempotent)
        return await self._http.infer(model, model_version, request_id, typed, parameters, outputs)

    def _region_pool(self) -> RegionPool:
        if self.pool is None:
            self._loop = asyncio.get_running_loop()
            self.pool = RegionPool("t", idle_limit=lambda: int(config.get("triton.shared-memory-pool-bytes")),
                                    destroyed=self._destroyed)
        return self.pool

    async def _take(self, nbytes: int) -> Region:
        """A leased region of the pool, registered with the server."""
        pool = self._region_pool()
        region = pool.take(nbytes)
        if region is None:
            free = shutil.disk_usage(SHM_DIR).free
            raise TritonError(
                f"cannot create a {size_class(nbytes)}-byte shared-memory region for a tensor: {SHM_DIR} has {free} "
                f"bytes free (give the machine or container a larger /dev/shm, or set "
                f"tdask.triton.shared-memory-threshold to 0 to send tensors in the messages)")
        if region.name not in self._registered:
            try:
                await self.client.register_system_shared_memory(region.name, region.key, region.size)
            except BaseException:
                region.retire()
                pool.give(region)
                raise
            self._registered.add(region.name)
            if pool.closed:  # closed while the region was being registered
                pool.give(region)
                raise TritonError("the Triton server's shared-memory pool was closed (server stopping)")
        return region

    def _destroyed(self, region: Region) -> None:
        """The pool removed ``region`` (in any thread): the server's registration of it goes too."""
        if region.name in self._registered and self._loop is not None:
            self._registered.discard(region.name)
            try:
                self._loop.call_soon_threadsafe(self._unregister, region.name)
            except RuntimeError:  # the loop is closed, and the server with it
                pass

    def _unregister(self, name: str) -> None:
        if self._client is None:
            return
        task = asyncio.ensure_future(self._client.unregister_system_shared_memory(name))
        self._unregistering.add(task)
        task.add_done_callback(self._unregistered)

    def _unregistered(self, task: asyncio.Task) -> None:
        self._unregistering.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the server may be gone
            logger.debug("unregistering a region failed: %r", task.exception())

    def reads_lent_frames(self, nbytes: int) -> bool:
        """Whether a tensor of ``nbytes`` that another process lends is best mapped where it lies: this
        server then reads it from the lender's region (:mod:`tdask.triton.peers`), not from a copy."""
        threshold = int(config.get("triton.shared-memory-threshold") or 0)
        return 0 < threshold <= nbytes and int(config.get("triton.peer-regions-bytes") or 0) > 0

    def _peer_regions(self) -> PeerRegions:
        if self._peers is None:
            self._peers = PeerRegions(self.client)
        return self._peers

    async def landing(self, nbytes: int) -> memoryview | None:
        """Room for a tensor of ``nbytes`` that is about to arrive, in a leased region of this server:
        received there, it is a model's input in place (no copy into a region). None below the
        shared-memory threshold. The region is back in the pool when the last view of it is gone."""
        threshold = int(config.get("triton.shared-memory-threshold") or 0)
        if threshold <= 0 or nbytes < threshold or self._region_pool().closed:
            return None
        region = await self._take(nbytes)
        return self._region_pool().lease_view(region, nbytes)

    def stats(self) -> dict[str, Any]:
        """What moved through shared memory, and what the pool and the peers' registrations hold now."""
        pool = self.pool
        return {"shm_calls": self.shm_calls, "inputs_in_place": self.shm_inputs_in_place,
                "inputs_from_peers": self.shm_inputs_from_peers,
                "leased_regions": len(pool.leased()) if pool is not None else 0,
                "peer_regions": self._peers.registered if self._peers is not None else [],
                "http": self._http.stats()}

    async def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        """Triton's KServe v2 metadata of a loaded model (its config after auto-complete), shapes as integers;
        asked once per model and version."""
        key = f"{model}:{version}"
        md = self._metadata.get(key)
        if md is None:
            try:
                raw = await self.client.get_model_metadata(model, model_version=version, as_json=True)
            except InferenceServerException as exc:
                raise _triton_error(model, exc) from exc
            tensors = lambda specs: [{"name": t["name"], "datatype": t["datatype"],  # noqa: E731
                                      "shape": [int(d) for d in t.get("shape", [])]} for t in specs]
            md = self._metadata[key] = {"platform": raw.get("platform", ""), "inputs": tensors(raw.get("inputs", [])),
                                        "outputs": tensors(raw.get("outputs", []))}
        return md

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        """Triton's config of a loaded model, after auto-complete (proto field names)."""
        try:
            raw = await self.client.get_model_config(model, model_version=version, as_json=True)
        except InferenceServerException as exc:
            raise _triton_error(model, exc) from exc
        return raw.get("config", raw)

    async def _shm_outputs(self, model: str, version: str, wanted: list[str] | None) -> list[tuple[str, bool]] | None:
        """(output name, variable size) for the model's outputs; None when shared memory cannot be used."""
        meta = self._metadata.get(f"{model}:{version}") or await self.model_metadata(model, version)
        out = []
        for tensor in meta["outputs"]:
            name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
            if wanted and name not in wanted:
                continue
            if datatype == "BYTES":
                return None
            variable = any(d < 0 for d in shape)
            out.append((name, variable))
        return out or None

    async def _infer_shm(self, model: str, typed: list[tuple[str, str, np.ndarray]], in_bytes: int,
                         outs: list[tuple[str, bool]], parameters: dict | None, request_id: str,
                         model_version: str, idempotent: bool) -> dict[str, np.ndarray]:
        key = (model, model_version, repr(sorted((parameters or {}).items())))
        known = self._ratio.get(key)
        ratio = max(1.0, known or 1.0)
        # outputs of a size not yet seen come back in the message: Triton would run the model before
        # finding that they do not fit a region
        sized = {name for name, var in outs if var}  # variable-size outputs: their size is learnt
        variable = sized if known is not None else set()
        out_capacity = _aligned(int(in_bytes * ratio) + _ALIGN)
        async with self._inputs_in_regions(typed, out_capacity * len(variable)) as (in_regions, region, lease, offset):
            out_regions: dict[str, OutputRegion] = {}
            for name, _ in outs:
                if name in variable:
                    out_regions[name] = OutputRegion(region.name, out_capacity, offset,
                                                     functools.partial(_view, lease, offset))
                    offset += out_capacity
            names = [name for name, _ in outs]
            try:
                arrays = await self._http.infer(model, model_version, request_id, typed, parameters, names,
                                                in_regions=in_regions, out_regions=out_regions)
            except TritonError as e:
                if "shared memory" not in str(e) or not variable:
                    raise
                # An output did not fit its region: the model ran, its output is lost.
                self._learn(key, ratio * 4)
                if not idempotent:
                    raise TritonError(
                        f"{model}: an output was larger than the {out_capacity}-byte shared-memory region "
                        f"sized from earlier requests with these parameters, so Triton could not return it; "
                        f"the model ran, and is not run again because its operator is not idempotent (set "
                        f"idempotent=True to allow that). Later requests get a larger region.") from e
                logger.info("%s: output larger than %d bytes; running it again with outputs in the message",
                            model, out_capacity)
                arrays = await self._http.infer(model, model_version, request_id, typed, parameters, names)
            self._learn(key, max((arrays[name].nbytes for name in sized if name in arrays), default=0) / in_bytes)
            self.shm_calls += 1
            return arrays

    @contextlib.asynccontextmanager
    async def _inputs_in_regions(self, typed: list[tuple[str, str, np.ndarray]], extra: int = 0,
                                 ) -> AsyncIterator[tuple[dict[str, InputRegion], Region | None, Any, int]]:
        """Where each input lies in a region registered with the server: where it already was (an earlier
        output, a peer's loan) or copied into a leased region taken with ``extra`` bytes more. Yields the
        inputs' places, that region (None when nothing is copied or added), its lease and the offset of the extra
        bytes; the region is retired when the body fails (the server may still write into it)."""
        pool = self._region_pool()
        in_regions: dict[str, InputRegion] = {}
        peers = []  # lenders' regions read in place: kept registered until the call ends
        try:
            for name, _, array in typed:
                found = pool.find(array)  # an earlier output: no copy
                if found is not None:
                    in_regions[name] = InputRegion(found[0].name, found[1])
                elif (lent := await self._peer_regions().use(array)) is not None:  # another process lent it
                    peers.append(lent[0])
                    in_regions[name] = InputRegion(lent[0].registered_as, lent[1])
                    self.shm_inputs_from_peers += 1
            self.shm_inputs_in_place += len(in_regions)
            copied = sum(_aligned(a.nbytes) for name, _, a in typed if name not in in_regions)
            if copied + extra == 0:  # every input lies in a region already: none to take
                yield in_regions, None, None, 0
                return
            region = await self._take(copied + extra)
            lease = pool.lease(region)  # the region is back in the pool once the last view of it is gone
            try:
                offset = 0
                for name, _, array in typed:
                    if name not in in_regions:
                        region.view(array.dtype, list(array.shape), offset)[...] = array
                        in_regions[name] = InputRegion(region.name, offset)
                        offset += _aligned(array.nbytes)
                yield in_regions, region, lease, offset
            except BaseException:
                region.retire()
                raise
        finally:
            for peer in peers:
                self._peers.done(peer)  # type: ignore[union-attr]

    async def stream(self, model: str, inputs: dict[str, np.ndarray], *, parameters: dict | None = None,
                     request_id: str = "", model_version: str = "",
                     ) -> AsyncIterator[tuple[dict[str, np.ndarray] | None, bool]]:
        """A decoupled model's responses (:meth:`TritonStreams.stream`); Triton reads inputs of the
        shared-memory threshold or more from a region, as :meth:`infer`'s, not from the message."""
        typed = [(name, self._check(name, array), array) for name, array in inputs.items()]
        async with contextlib.AsyncExitStack() as stack:
            in_regions = None
            if _shm_bytes(typed) is not None:
                in_regions, _, _, _ = await stack.enter_async_context(self._inputs_in_regions(typed))
            responses = await stack.enter_async_context(contextlib.aclosing(self.streams.stream(
                model, inputs, parameters=parameters, request_id=request_id, model_version=model_version,
                in_regions=in_regions)))
            async for response in responses:
                yield response
        if in_regions is not None:
            self.shm_calls += 1

    def _learn(self, key: tuple[str, str, str], ratio: float) -> None:
        self._ratio[key] = max(self._ratio.pop(key, 0.0), ratio)  # re-inserted: the newest are kept
        if len(self._ratio) > int(config.get("triton.output-sizes-remembered")):  # parameters unique per request
            del self._ratio[next(iter(self._ratio))]

    async def close(self) -> None:
        await self._http.close()
        await self.streams.close()
        if self._peers is not None:
            peers, self._peers = self._peers, None
            await peers.close()
        if self.pool is not None:
            pool, self.pool = self.pool, None
            names, self._registered = set(self._registered), set()
            for name in names:
                try:
                    await self.client.unregister_system_shared_memory(name)
                except Exception:  # noqa: BLE001 - the server may be gone
                    pass
            pool.close()  # arrays still viewing a region keep it mapped until the last of them is gone
        if self._unregistering:
            await asyncio.gather(*self._unregistering, return_exceptions=True)
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
