#!/usr/bin/env bash
# The GPU check, as one command on the device machine (one H100, Python 3.12, CUDA 13), < 8 minutes:
#   here:  bash benchmarks/gpu/fetch_wheels.sh
#   there: bash benchmarks/gpu/run.sh      (with .whl carried)
# It runs the gpu-marked tests that need no Triton (CuPy between GPU operators over UCX, device to
# device, cuda serializer) and the transport benchmark with CuPy tensors, and writes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/tdask-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export UCX_TLS=${UCX_TLS:-tcp,cuda_copy,cuda_ipc,sm,self} UCX_WARN_UNUSED_ENV_VARS=n
nvidia-smi -L | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -p no:cacheprovider -v -rs -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
timeout 200 python3 -m benchmarks.transport --gpu --protocols ucx,tcp --repeat 5 --out "$OUT" 2>&1 \
    | grep -v "^INFO\|distributed\." | tee "$OUT/transport-gpu.log"
