#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 30),
# starting from the checked-in corpus (fuzz/corpus/TARGET) plus the real
# files in ../shared/models as seeds. New inputs go to a scratch corpus, so
# the checked-in one only changes when someone merges into it on purpose.
# A crash fails the run and leaves the input in fuzz/artifacts/TARGET.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS 0 means no time limit; FUZZ_RUNS=N stops each target after N
# executions instead, and FUZZ_SANITIZER=none builds without AddressSanitizer
# (about twice as fast; Rust's bounds and overflow checks stay on). The
# recorded long runs in docs/FUZZING.md used both.
#
# Installs cargo-fuzz (crates.io) once. libFuzzer needs a nightly compiler;
# on a stable toolchain RUSTC_BOOTSTRAP=1 unlocks the same flags.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] ||
    targets=(checkpoint tokenizer encode gguf pickle safetensors hf_config sentencepiece)
models=../shared/models

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --quiet --locked cargo-fuzz
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

# Seeds from the real files: checkpoints, tokenizers, GGUF, torch.save,
# safetensors, config.json and SentencePiece files as they are, and for the
# tokenizer target in its framing (mode byte, text length, file, text).
# Files longer than -max_len are read cut to it: their headers stay, but a
# zip archive loses its directory (at the end), so the torch.save files are
# also repacked with every storage cut to 64 bytes, which keeps their real
# pickles whole.
seeds_for() {
    local target=$1 dir=$2
    case $target in
        checkpoint)
            cp "$models/stories260K.bin" "$models/stories260K_q8_gs4.bin" "$dir/" ;;
        tokenizer)
            for f in tok512.bin tokenizer.bin; do
                python3 - "$models/$f" "$dir/real-$f" <<'PY'
import struct, sys
text = "Once upon a time, Ünïcödé 🦙".encode()
body = open(sys.argv[1], "rb").read()
open(sys.argv[2], "wb").write(b"\0" + struct.pack("<H", len(text)) + body + text)
PY
            done ;;
        encode) ;;
        gguf)
            cp "$models"/gguf/*.gguf "$dir/" ;;
        pickle)
            for f in stories260K-ckpt.pt meta/stories260K/consolidated.00.pth; do
                cp "$models/$f" "$dir/"
                python3 - "$models/$f" "$dir/small-$(basename "$f")" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as src, \
        zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_STORED) as dst:
    for e in src.infolist():
        data = src.read(e)
        dst.writestr(e.filename, data[:64] if "/data/" in e.filename else data)
PY
            done ;;
        safetensors)
            cp "$models/hf/stories260K/model.safetensors" \
                "$models"/hf/stories260K-bf16-sharded/*.safetensors "$dir/" ;;
        hf_config)
            for f in "$models"/hf/*/config.json; do
                cp "$f" "$dir/$(basename "$(dirname "$f")").json"
            done ;;
        sentencepiece)
            cp "$models/tok512.model" "$models/tokenizer.model" "$dir/" ;;
    esac
}

sanitizer=${FUZZ_SANITIZER:-address}
runs=${FUZZ_RUNS:--1}
cargo fuzz build --release --sanitizer "$sanitizer"
for target in "${targets[@]}"; do
    scratch=$(mktemp -d)
    seeds=$(mktemp -d)
    log=$(mktemp)
    seeds_for "$target" "$seeds"
    echo "fuzzing $target (${seconds}s, runs $runs, sanitizer $sanitizer)"
    # -max_len keeps mutations small and fast; the real seeds are longer and
    # are read truncated to it, which keeps their headers.
    status=0
    cargo fuzz run --release --sanitizer "$sanitizer" "$target" \
        "$scratch" "fuzz/corpus/$target" "$seeds" -- \
        -max_total_time="$seconds" -runs="$runs" -max_len=65536 -rss_limit_mb=4096 \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^Done|SUMMARY|panicked|crash-" "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz target $target failed (exit $status); the input is in fuzz/artifacts/$target" >&2
        exit 1
    fi
    rm -rf "$scratch" "$seeds" "$log"
done
# A failure exits above; this line sums up for test runners and readers.
echo "fuzz: ${#targets[@]} passed, 0 failed"
