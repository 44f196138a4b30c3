#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs NVRTC and the CUDA headers
# from PyPI into .nvrtc/ (once) so the kernel compile test runs without a GPU
# or a CUDA toolkit, then runs every crate's tests, the core library's tests
# for aarch64 under qemu (NEON kernels; see scripts/test-aarch64.sh), a
# smoke run of the reference benchmark script (our engine only, tiny shape,
# at the widest level and forced to scalar), the server's end-to-end tests
# with real clients (scripts/test-serve.sh) and every fuzz target for FUZZ_SECONDS each (default 30; 0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .nvrtc/nvidia/cu13 ] && [ ! -d .nvrtc/nvidia/cuda_nvrtc ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target .nvrtc \
        'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*'
fi
eval "$(bash crates/llama2-cuda/nvrtc-env.sh .nvrtc)"
cargo test --workspace "$@"
# The golden texts again with the AVX2 kernels forced (AVX-512 machines
# would otherwise never run them end to end).
LLAMA2_ISA=avx2 cargo test -p llama2 --test golden
bash scripts/test-aarch64.sh
bash scripts/test-serve.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 scripts/bench-reference.py --ours target/debug/llama2 --work "$work" \
    --shapes stories260K --rounds 1 --gen-tokens 4 --prompt-tokens 4 >/dev/null
# Again with a forced level: `bench --isa` and the wall built without AVX-512,
# and ours with an f16 KV cache (the scalar level widens its rows).
python3 scripts/bench-reference.py --ours target/debug/llama2 --work "$work" --isa scalar \
    --ours-args "--kv-dtype f16" \
    --shapes stories260K --rounds 1 --gen-tokens 4 --prompt-tokens 4 >/dev/null
if [ "${FUZZ_SECONDS:-30}" != 0 ]; then
    bash scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
fi
