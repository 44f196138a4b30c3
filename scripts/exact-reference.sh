#!/usr/bin/env bash
# Writes llama2.c's output for every case of crates/llama2-cli/tests/exact/
# cases.tsv into NAME.txt beside it: the expected texts of `llama2 --exact`.
# Usage: scripts/exact-reference.sh LLAMA2C_DIR [MODELS_DIR]
# LLAMA2C_DIR is a llama2.c checkout; run.c and runq.c are compiled from it
# with `gcc -O3 ... -lm`, the flags of its `make run` (no -ffast-math, no
# FMA contraction: the arithmetic --exact reproduces). Random models are
# written with target/release/llama2 synth (build it first).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?usage: scripts/exact-reference.sh LLAMA2C_DIR [MODELS_DIR]}
models=${2:-../shared/models}
dir=crates/llama2-cli/tests/exact
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for prog in run runq; do
    gcc -O3 -o "$work/$prog" "$src/$prog.c" -lm
done
grep -v '^#' "$dir/cases.tsv" | while IFS=$'\t' read -r name model tok prog flags; do
    case "$model" in
    synth:*)
        IFS=: read -r _ shape format <<<"$model"
        path="$work/$shape-$format.bin"
        [ -f "$path" ] || target/release/llama2 synth --shape "$shape" --format "$format" \
            --seed 42 "$path" >/dev/null 2>&1
        ;;
    *) path="$models/$model" ;;
    esac
    # shellcheck disable=SC2086 # flags are words
    "$work/$prog" "$path" -z "$models/$tok" $flags >"$dir/$name.txt" 2>/dev/null
    echo "$name: $(wc -c <"$dir/$name.txt") bytes"
done
