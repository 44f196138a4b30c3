#!/usr/bin/env python3
"""Decode speed of llama2-rs against llama2.c and llama.cpp on the same
machine, in the same run, on identical random checkpoints.

For each shape it writes a random checkpoint with `llama2 synth` (v0 fp32
and v2 int8), converts the fp32 one to GGUF F32 and Q8_0 for llama.cpp, then
runs every engine once per round, round after round (so a noisy machine
slows all of them alike), and prints the median decode tok/s of each with
our ratios to them as a Markdown table. Raw results go to `results.jsonl`
in the work folder.

Engines you do not point it at are left out:
  --llama2c DIR    a llama2.c checkout: run.c and runq.c are compiled there
                   with gcc -Ofast -fopenmp -march=native (the flags of the
                   reference numbers) into the work folder
  --llama-cpp DIR  a folder with llama.cpp's llama-bench, llama-quantize and
                   llama-convert-llama2c-to-ggml binaries
  --llama-cpp-src DIR
                   a llama.cpp source tree, built here with CMake (Release,
                   CPU only) for the --isa level: GGML_NATIVE, or for avx2
                   AVX2/FMA/F16C without AVX-512, AVX-VNNI or AMX

--isa avx2 times every engine at the AVX2 level on any x86 machine: our
`bench --isa avx2`, llama2.c and the wall compiled with -mno-avx512f, and
llama.cpp built without AVX-512. That is how the AVX2 numbers of an
AVX-512 machine are made; say so when you quote them.

--ours-args passes more flags to our `bench`: `--ours-args "--kv-dtype
f16"` times ours with llama.cpp's default cache type (ours keeps f32 by
default, llama2.c's); say so when you quote such numbers.

It also times the fp32 "wall" unless --no-wall: scripts/products-only.c,
compiled with gcc -O3 -march=native -fopenmp, which does nothing per token
but the matrix-vector products of the same v0 file (AVX-512, spinning
OpenMP threads), reading a copy of it in transparent huge pages as our CPU
backend reads its weights. No fp32 engine can decode much faster than that
on the machine, so "ours / products only" is our share of what is
reachable.

Decoding is greedy everywhere (llama2.c `-t 0`): with sampling, llama2.c's
top-p sort over 32000 tokens dominates and hides the forward pass.
llama.cpp's converter stores the token embedding and the classifier as two
tensors, but a token reads one embedding row, so every engine streams the
same bytes per token at fp32.
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release" / "llama2"
# Context lengths of the shapes `llama2 synth` writes.
CONTEXT = {"stories260K": 512, "stories15M": 256, "stories42M": 1024, "stories110M": 1024}


def run(cmd, env=None):
    """Runs `cmd`, returning stdout and stderr together; fails loudly."""
    p = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-2000:]}")
    return p.stdout + p.stderr


def ours(binary, model, threads, gen, prompt, extra):
    """Our decode (and prefill) tok/s on a checkpoint file; `extra` are more
    `bench` flags (the --isa level, --ours-args)."""
    out = run([binary, "bench", "--device", "cpu", "--model", model, "--threads", threads,
               "--prompt-tokens", prompt, "--gen-tokens", gen, "--runs", 1, "--json"] + extra)
    line = json.loads(out.strip().splitlines()[-1])
    return line["decode_tok_s"], line["prefill_tok_s"]


def ours_flags(args):
    """The `bench` flags beyond the measurement's own: the level, then
    --ours-args."""
    return (["--isa", args.isa] if args.isa else []) + shlex.split(args.ours_args)


def llama2c(binary, model, tokenizer, threads, gen):
    """llama2.c's own `achieved tok/s` line, greedy."""
    out = run([binary, model, "-z", tokenizer, "-n", gen, "-t", 0],
              env={"OMP_NUM_THREADS": str(threads)})
    m = re.search(r"achieved tok/s: ([0-9.]+)", out)
    if not m:
        sys.exit(f"no 'achieved tok/s' in {binary}'s output:\n{out[-500:]}")
    return float(m.group(1))


def products_only(binary, model, threads, gen):
    """The fp32 wall: scripts/products-only.c's tok/s on the same file."""
    out = run([binary, model, gen],
              env={"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "active"})
    m = re.search(r"products-only tok/s: ([0-9.]+)", out)
    if not m:
        sys.exit(f"no 'products-only tok/s' in {binary}'s output:\n{out[-500:]}")
    return float(m.group(1))


def llama_bench(tools, gguf, threads, gen, prompt):
    """llama.cpp's text-generation (and prompt-processing) tok/s from one
    llama-bench repetition of each."""
    out = run([tools / "llama-bench", "-m", gguf, "-t", threads, "-p", prompt, "-n", gen,
               "-r", 1, "-o", "json"])
    results = json.loads(out[out.index("["):out.rindex("]") + 1])
    speed = {"tg" if r["n_gen"] else "pp": r["avg_ts"] for r in results}
    return speed["tg"], speed.get("pp")


def prepare(shape, work, args):
    """Writes the shape's files; returns {engine: zero-argument timer}, each
    timer giving (decode tok/s, prefill tok/s or None)."""
    v0, v2 = work / f"{shape}_v0.bin", work / f"{shape}_v2.bin"
    for path, fmt in [(v0, "v0"), (v2, "v2")]:
        if not path.exists():
            run([args.ours, "synth", "--shape", shape, "--format", fmt, path])
    t, gen, tok = args.threads, args.gen_tokens, args.tokenizer
    # `bench` times one untimed step and then `gen`, within the context
    # (stories15M's is 256; run.c's -n 256 decodes 255 tokens there too).
    ours_gen = min(gen, CONTEXT.get(shape, gen + 1) - 1)
    timers = {
        "ours f32": lambda: ours(args.ours, v0, t, ours_gen, args.prompt_tokens, ours_flags(args)),
        "ours q8": lambda: ours(args.ours, v2, t, ours_gen, args.prompt_tokens, ours_flags(args)),
    }
    if args.wall:
        timers["products only"] = lambda: (products_only(work / "products-only", v0, t, gen), None)
    if args.llama2c:
        timers["llama2.c run"] = lambda: (llama2c(work / "run", v0, tok, t, gen), None)
        timers["llama2.c runq"] = lambda: (llama2c(work / "runq", v2, tok, t, gen), None)
    if args.llama_cpp:
        tools = args.llama_cpp
        f32, q8 = work / f"{shape}_f32.gguf", work / f"{shape}_q8_0.gguf"
        if not f32.exists():
            run([tools / "llama-convert-llama2c-to-ggml", "--copy-vocab-from-model", tok,
                 "--llama2c-model", v0, "--llama2c-output-model", f32])
        if not q8.exists():
            run([tools / "llama-quantize", f32, q8, "Q8_0", t])
        timers["llama.cpp F32"] = lambda: llama_bench(tools, f32, t, gen, args.prompt_tokens)
        timers["llama.cpp Q8_0"] = lambda: llama_bench(tools, q8, t, gen, args.prompt_tokens)
    return timers


def march(isa):
    """gcc flags for the --isa level: the machine's own, or without AVX-512."""
    return ["-march=native"] + (["-mno-avx512f"] if isa in ("avx2", "scalar") else [])


def compile_llama2c(src, work, isa):
    for name in ["run", "runq"]:
        run(["gcc", "-Ofast", "-fopenmp", *march(isa), src / f"{name}.c", "-lm",
             "-o", work / name])


def compile_wall(work, isa):
    run(["gcc", "-O3", *march(isa), "-fopenmp", ROOT / "scripts" / "products-only.c",
         "-o", work / "products-only"])


def build_llama_cpp(src, work, isa):
    """Builds llama.cpp's CPU tools from `src` for the --isa level; returns
    the folder of its binaries."""
    build = work / f"llama.cpp-{isa or 'native'}"
    flags = ["-DGGML_NATIVE=ON"]
    if isa == "avx2":
        flags = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
                 "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF",
                 "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AVX_VNNI=OFF",
                 "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    elif isa:
        sys.exit(f"--llama-cpp-src builds for the native level or avx2, not {isa}")
    if not (build / "bin" / "llama-bench").exists():
        run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
             "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DGGML_CUDA=OFF", *flags])
        run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target",
             "llama-bench", "llama-quantize", "llama-convert-llama2c-to-ggml"])
    return build / "bin"


def table(samples, prefill):
    """Markdown rows: our medians, the references' medians, and the median
    over rounds of our ratio to each reference within the round (with its
    range), which cancels most of a shared machine's drift."""
    pairs = [("f32", "ours f32", ["llama2.c run", "llama.cpp F32", "products only"]),
             ("q8", "ours q8", ["llama2.c runq", "llama.cpp Q8_0", None])]
    lines = ["| shape | dtype | ours decode tok/s | llama2.c | llama.cpp | products only "
             "| ours / llama2.c | ours / llama.cpp | ours / products only "
             "| ours prefill tok/s | llama.cpp prefill | prefill ours / llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    med = statistics.median

    def ratio(mine, theirs):
        ratios = [a / b for a, b in zip(mine, theirs)]
        return f"{med(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    for shape, m in samples.items():
        for dtype, mine, refs in pairs:
            cells = [shape, dtype, f"{med(m[mine]):,.1f}"]
            cells += [f"{med(m[r]):,.1f}" if r in m else "" for r in refs]
            cells += [ratio(m[mine], m[r]) if r in m else "" for r in refs]
            cpp = prefill[shape].get(refs[1], [])
            cells.append(f"{med(prefill[shape][mine]):,.0f}")
            cells.append(f"{med(cpp):,.0f}" if cpp else "")
            cells.append(ratio(prefill[shape][mine], cpp) if cpp else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama2c", type=Path, help="llama2.c checkout (run.c, runq.c)")
    ap.add_argument("--llama-cpp", type=Path, help="folder of llama.cpp binaries")
    ap.add_argument("--llama-cpp-src", type=Path,
                    help="llama.cpp source tree to build for the --isa level")
    ap.add_argument("--isa", help="instruction-set level for every engine (e.g. avx2)")
    ap.add_argument("--no-wall", dest="wall", action="store_false",
                    help="leave out the products-only fp32 wall")
    ap.add_argument("--shapes", nargs="+", default=["stories15M", "stories42M", "stories110M"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=256,
                    help="our prefill measurement (the references are timed on decode)")
    ap.add_argument("--tokenizer", type=Path,
                    default=ROOT.parent / "shared" / "models" / "tokenizer.bin")
    ap.add_argument("--work", type=Path, default=ROOT / "target" / "bench-reference")
    ap.add_argument("--ours", type=Path, default=RELEASE, help="the llama2 binary to time")
    ap.add_argument("--ours-args", default="",
                    help="more flags for our bench, e.g. '--kv-dtype f16' (llama.cpp's default "
                         "cache type)")
    args = ap.parse_args()
    args.ours = args.ours.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.ours.exists():
        sys.exit(f"{args.ours} is missing: run `cargo build --release` first")
    if args.llama_cpp_src:
        args.llama_cpp = build_llama_cpp(args.llama_cpp_src.resolve(), args.work, args.isa)
    if (args.llama2c or args.llama_cpp) and not args.tokenizer.exists():
        sys.exit(f"{args.tokenizer} is missing: pass --tokenizer (the Llama 2 tokenizer.bin)")
    if args.llama2c:
        compile_llama2c(args.llama2c, args.work, args.isa)
    if args.wall:
        compile_wall(args.work, args.isa)
    timers = {s: prepare(s, args.work, args) for s in args.shapes}
    samples = {s: {e: [] for e in t} for s, t in timers.items()}
    prefill = {s: {e: [] for e in t} for s, t in timers.items()}
    with open(args.work / "results.jsonl", "a") as log:
        for r in range(args.rounds):
            for shape, engines in timers.items():
                for engine, timer in engines.items():
                    got, pre = timer()
                    if pre is not None:
                        prefill[shape][engine].append(pre)
                    samples[shape][engine].append(got)
                    print(f"round {r + 1} {shape} {engine}: {got:.1f} tok/s", file=sys.stderr)
                    log.write(json.dumps({"round": r, "shape": shape, "engine": engine,
                                          "decode_tok_s": got, "prefill_tok_s": pre}) + "\n")
    level = f", --isa {args.isa}" if args.isa else ""
    level += f", ours with {args.ours_args}" if args.ours_args else ""
    print(f"{args.threads} threads{level}, {args.gen_tokens} greedy tokens, prefill of "
          f"{args.prompt_tokens}, median of {args.rounds} rounds; ratios: median (range) of "
          "the per-round ratios\n")
    print(table(samples, prefill))


if __name__ == "__main__":
    main()
