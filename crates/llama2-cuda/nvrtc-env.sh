#!/bin/sh
# Prints the environment the NVRTC compile test needs when NVRTC comes from
# pip wheels instead of a CUDA install, e.g. in CI:
#   python3 -m pip install --target .nvrtc 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*'
#   eval "$(crates/llama2-cuda/nvrtc-env.sh)"
#   CI=true cargo test -p llama2-cuda
# The kernels include no CUDA headers, so no include path is needed.
root=$(cd "$(dirname "$0")/../.." && pwd)
lib="$root/.nvrtc/nvidia/cu13/lib"
echo "export LLAMA2_NVRTC_DIR='$lib'"
echo "export LD_LIBRARY_PATH='$lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
