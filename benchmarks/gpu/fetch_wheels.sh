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
# what `pip install 'tdask[ucx-cu13]'` resolves to on Python 3.12 (distributed-ucxx 0.52 pins Dask 2026.7.1)
pip_download dask==2026.7.1 distributed==2026.7.1 'distributed-ucxx-cu13==0.52.*' 'ucxx-cu13==0.52.*' \
    'libucxx-cu13==0.52.*' 'libucx-cu13==1.21.*' 'librmm-cu13==26.10.*' 'rmm-cu13==26.10.*' \
    'rapids-dask-dependency==26.10.*' rapids-logger lazy_importer cuda-core cuda-pathfinder partd locket tblib zict \
    tornado importlib_metadata
du -sh .whl
