#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs NVRTC and the CUDA headers
# from PyPI into .nvrtc/ (once) so the kernel compile test runs without a GPU
# or a CUDA toolkit, then runs every crate's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .nvrtc/nvidia/cu13 ] && [ ! -d .nvrtc/nvidia/cuda_nvrtc ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target .nvrtc \
        'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*'
fi
eval "$(bash crates/llama2-cuda/nvrtc-env.sh .nvrtc)"
cargo test --workspace "$@"
