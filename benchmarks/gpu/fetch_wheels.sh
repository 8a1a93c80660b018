#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (Python 3.12, CUDA 13), into .whl/ (git-ignored).
# The GPU image already has numpy 2, cupy-cuda13x, msgpack, psutil, toolz, tqdm, prometheus-client,...
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
pip_download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$@"
}
pip_download dask==2026.1.1 distributed==2026.1.1 'distributed-ucxx-cu13==0.48.*' 'ucxx-cu13==0.48.*' \
    'libucxx-cu13==0.48.*' 'libucx-cu13>=1.19,<1.21' 'librmm-cu13==26.2.*' 'rmm-cu13==26.2.*' 'rapids-dask-dependency==26.2.*' rapids-logger partd locket tblib zict \
    tornado importlib_metadata
du -sh .whl
