#!/usr/bin/env bash
# GPU acceptance run: on a machine with an NVIDIA GPU and the release binary
# already built (no Rust needed), checks GPU logits against the CPU for every
# precision on stories260K and on synthetic shapes, compares the greedy text
# with the CPU's, then prints the benchmark table. Writes everything to a log.
#
#   scripts/gpu-check.sh [MODELS_DIR] [LOG_FILE]
#
# MODELS_DIR holds stories260K.bin, stories260K_q8_gs4.bin and tok512.bin,
# and hf/stories260K-bf16-sharded and hf/llama3-tiny-random (Hugging Face
# fixtures: bf16 weights, theta and Llama 3 RoPE scaling on the GPU) when
# present (default ../shared/models). Set LLAMA2 to use another binary. Takes about
# five minutes on an H100; a failing step is reported and the run goes on.
set -u
models=${1:-../shared/models}
log=${2:-gpu-check.log}
bin=${LLAMA2:-target/release/llama2}
failures=0
: >"$log"

say() { echo "$*" | tee -a "$log"; }

# Runs one step with a time limit, logging its output and its outcome.
step() {
    local limit=$1
    shift
    say "\$ $*"
    if timeout "$limit" "$@" >>"$log" 2>&1; then
        say "  ok"
    else
        say "  FAILED (exit $?)"
        failures=$((failures + 1))
    fi
}

say "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$log" 2>&1
say "date: $(date -u +%Y-%m-%dT%H:%MZ)"

say "== correctness: GPU logits against the CPU"
for dtype in f32 f16 bf16 q8; do
    step 120 "$bin" check "$models/stories260K.bin" --device cuda --dtype "$dtype" --prompt-tokens 16 --steps 16
done
step 120 "$bin" check "$models/stories260K_q8_gs4.bin" --device cuda --prompt-tokens 16 --steps 16
for hf in stories260K-bf16-sharded llama3-tiny-random; do
    if [ -d "$models/hf/$hf" ]; then
        step 120 "$bin" check "$models/hf/$hf" --device cuda --prompt-tokens 16 --steps 16
    fi
done
for dtype in f32 f16 bf16 q8; do
    step 120 "$bin" check --shape stories15M --device cuda --dtype "$dtype"
done
for dtype in f32 f16 bf16 q8; do
    step 240 "$bin" check --shape llama2-7b --device cuda --dtype "$dtype" --prompt-tokens 4 --steps 2
done

say "== greedy text: GPU (fp32) against CPU"
cpu_text=$("$bin" "$models/stories260K.bin" -z "$models/tok512.bin" -t 0 -n 200 --device cpu 2>/dev/null)
gpu_text=$("$bin" "$models/stories260K.bin" -z "$models/tok512.bin" -t 0 -n 200 --device cuda 2>>"$log")
if [ -n "$gpu_text" ] && [ "$cpu_text" = "$gpu_text" ]; then
    say "  same text"
else
    say "  DIFFERENT text"
    say "cpu: $cpu_text"
    say "gpu: $gpu_text"
    failures=$((failures + 1))
fi

say "== benchmarks (decode at batch 1; prefill batched)"
bench() { step 150 "$bin" bench --device cuda --runs 3 --json "$@"; }
for shape in stories15M stories42M stories110M; do
    bench --shape "$shape" --dtype f32 --prompt-tokens 256 --gen-tokens 256
done
for dtype in f32 f16 bf16 q8; do
    bench --shape llama2-7b --dtype "$dtype" --prompt-tokens 512 --gen-tokens 128
done

say "== summary: $failures failed step(s)"
grep -E '^\{' "$log" | tee -a "$log.json" >/dev/null
exit $((failures > 0))
