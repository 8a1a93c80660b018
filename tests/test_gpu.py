"""GPU path: CuPy tensors stay on the device between operators over UCX. Skipped cleanly without a GPU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]
cupy = pytest.importorskip("cupy", reason="CuPy is not installed: no GPU tests here")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
except Exception as e:  # no driver
    pytest.skip(f"no usable CUDA device: {e}", allow_module_level=True)
pytest.importorskip("distributed_ucxx", reason="GPU tensors move device to device only over UCX")

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("UCX_TLS", "tcp,cuda_copy,cuda_ipc,sm,self")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def count_serializers():
    """Installed on a worker: counts which serializer decoded each frame header it received."""
    import collections
    import importlib

    # the module: "import distributed.protocol.serialize as ser" gives the function that distributed.protocol
    # exports under the same name
    ser = importlib.import_module("distributed.protocol.serialize")

    counts = collections.Counter()
    original = ser.deserialize

    def counting(header, frames, deserializers=None):
        counts[header.get("serializer")] += 1
        return original(header, frames, deserializers=deserializers)

    ser.deserialize = counting
    ser._tdask_counts = counts


def read_counts():
    import importlib

    ser = importlib.import_module("distributed.protocol.serialize")

    return dict(ser._tdask_counts)


async def _gpu_cluster():
    from tdask.deploy.cluster import start_embedded_cluster

    return await start_embedded_cluster(n_workers=0, gpus=2, protocol="ucx", scheduler_port=0,
                                        dashboard_address=":0")


def test_cupy_tensor_moves_device_to_device_between_gpu_operators_over_ucx():
    from distributed import Client

    import tdask

    async def main():
        cluster = await _gpu_cluster()
        try:
            async with Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True) as client:
                repo = ROOT / "benchmarks" / "operators"
                ops = [tdask.OperatorConfig("source", "transfer_ops:Source", repository=repo, device="GPU"),
                       tdask.OperatorConfig("sink", "transfer_ops:Sink", repository=repo, device="GPU")]
                async with tdask.Deployment(client, ops) as d:
                    sink_worker = next(r["worker"] for r in d.replicas if r["name"] == "sink")
                    await client.run(count_serializers, workers=[sink_worker])
                    async with await tdask.connect(client) as session:
                        source, sink = await session.operator("source"), await session.operator("sink")
                        ref = await source.infer(parameters={"nbytes": 8 * 2**20}, keep=True)
                        out = await sink.infer({"input": ref["output"]})
                        stream = session.pool.streams[sink_worker]
                        assert "ucx" in type(stream.comm).__module__.lower()
                    counts = (await client.run(read_counts, workers=[sink_worker]))[sink_worker]
            return out, counts
        finally:
            await cluster.close()

    out, counts = asyncio.run(main())
    assert bool(out["on_gpu"][0]), "the tensor must arrive on the GPU"
    assert int(out["nbytes"][0]) == 8 * 2**20 and int(out["last"][0]) == 2**20 - 1
    assert counts.get("cuda", 0) >= 1, f"the cuda serializer must have moved the frames: {counts}"


def test_cupy_input_to_gpu_encoder_comes_out_of_gpu_decoder_on_the_device():
    from tdask.triton import environment

    made = environment.ensure()
    if subprocess.run([str(made.path / "bin" / "python"), "-c", "import cupy"], capture_output=True).returncode:
        pytest.skip("Triton's environment has no CuPy for the GPU model instances: set "
                    "tdask.triton.environment-packages to ['cupy-cuda12x<14'] (or the CUDA 13 build)")
    from distributed import Client

    import tdask

    models = ROOT / "operators" / "triton_core_models"

    async def main():
        cluster = await _gpu_cluster()
        try:
            async with Client(cluster.scheduler_address, asynchronous=True, direct_to_workers=True) as client:
                ops = [tdask.OperatorConfig("encoder", repository=models, device="GPU"),
                       tdask.OperatorConfig("decoder", repository=models, device="GPU")]
                async with tdask.Deployment(client, ops):
                    async with await tdask.connect(client) as session:
                        enc, dec = await session.operator("encoder"), await session.operator("decoder")
                        x = cupy.arange(1000, dtype=cupy.int64)
                        f = enc.infer({"input": x}, {"input_copies": 2}, keep=True)
                        on_gpu = await dec.infer({"input": f.output("output")}, {"input_copies": 2},
                                                 output_device="gpu")
                        as_numpy = await dec.infer({"input": f.output("output")}, {"input_copies": 2},
                                                   output_device="cpu")
                        return x, on_gpu, as_numpy
        finally:
            await cluster.close()

    x, on_gpu, as_numpy = asyncio.run(main())
    assert isinstance(on_gpu["output"], cupy.ndarray)
    assert bool(cupy.all(on_gpu["output"] == x))
    assert isinstance(as_numpy["output"], np.ndarray)
    assert np.array_equal(as_numpy["output"], cupy.asnumpy(x))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
