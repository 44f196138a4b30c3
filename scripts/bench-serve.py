#!/usr/bin/env python3
"""Streaming throughput and latency of OpenAI-compatible completion servers:
`llama2 serve` against llama.cpp's `llama-server`, same machine, same run,
same GGUF file.

For every round it starts each server in turn (only one runs at a time),
waits for `GET /health` to answer 200, sends one untimed warm-up request,
and then, for each concurrency level N, fires N streaming
`POST /v1/completions` requests at once (`"stream": true`, fixed
`max_tokens`, `ignore_eos` so random weights do not stop early, and
`stream_options.include_usage`). The engines take turns round by round, in
alternating order, so a noisy machine slows both alike.

Per request it measures
  TTFT            time from sending the request to the first SSE chunk
                  that carries generated text
  decode tok/s    (generated tokens - 1) / (last chunk - first token)
and per burst of N requests
  aggregate tok/s all generated tokens / wall time from the first request
                  sent to the last stream finished.
Generated tokens come from the `usage.completion_tokens` of the final chunk
when the server sends one, else from the number of text chunks.

With --cli, each round also times our server's single-stream decode
without a streaming client: non-streaming requests of `max_tokens` and of
1 token, alternating (--whole-requests of each), decode tok/s =
(tokens - 1) / (median time of the long - median time of the short). The
prompt, HTTP and JSON costs are in both and cancel, and the client parses
one response instead of an SSE event per token, so on a 2-core machine
this isolates the server's own decode rate from the client's work.

It prints a Markdown table (medians over rounds of the aggregate, medians
over all requests of the per-stream rate, p50/p90 TTFT), then our ratios to
llama-server: aggregate and TTFT at each level, each engine's aggregate at
N over its own single-stream rate, and, with --cli, our single-stream
server decode over the CLI's own `achieved tok/s` on the same model and
prompt. Raw results go to `results.jsonl` in the work folder, server logs
beside it.

Server commands are templates: `{model}` becomes --model and `{port}` a
free port (`--port PORT` is appended when there is no `{port}`). A bare
binary path gets the standard command line:
  ours          BIN serve {model} --port {port} --threads T
  llama-server  BIN -m {model} --port {port} -t T -np MAXN -cb -c MAXN*CTX
(CTX is --ctx, the per-stream context, 256 for stories15M). Where
llama.cpp's AMX weight repacking crashes (it segfaults in
ggml_backend_amx_mul_mat in some sandboxes), pass llama-server a template
with `--no-repack`, which keeps its AVX-512 Q8_0 kernels.

On a 2-core machine any other load distorts the 16-stream numbers badly
(spinning thread barriers stall when a core is taken away), so the report
gives the load average before and after the run.

Example (both engines, stories15M Q8_0, 2 threads):
  python3 scripts/bench-serve.py --model stories15M_q8_0.gguf \\
      --ours target/release/llama2 --cli target/release/llama2 \\
      --llama-server /path/to/llama-server --concurrency 1,16 --rounds 3
"""

import argparse
import http.client
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

OURS, LLAMA_SERVER = "ours", "llama-server"


# --- starting and stopping servers ---------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_line(engine, template, args):
    """The argv that starts `engine` on a fresh port; returns (argv, port)."""
    port = free_port()
    words = shlex.split(template)
    if len(words) == 1:
        if engine == OURS:
            words += ["serve", "{model}", "--port", "{port}", "--threads", str(args.threads)]
        else:
            n = max(args.concurrency)
            words += ["-m", "{model}", "--port", "{port}", "-t", str(args.threads),
                      "-np", str(n), "-cb", "-c", str(n * args.ctx)]
    if not any("{port}" in w for w in words):
        words += ["--port", "{port}"]
    fill = {"model": str(args.model or ""), "port": str(port)}
    return [w.format(**fill) for w in words], port


class Server:
    """One server process, listening on 127.0.0.1:port, logging to a file."""

    def __init__(self, engine, template, args, log):
        self.engine = engine
        self.argv, self.port = command_line(engine, template, args)
        self.log_path = log
        self.log = open(log, "ab")
        self.log.write(f"\n$ {shlex.join(self.argv)}\n".encode())
        self.log.flush()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"exited with {self.proc.returncode} before /health answered")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.fail(f"/health not 200 within {timeout} s")

    def fail(self, why):
        self.stop()
        tail = Path(self.log_path).read_text(errors="replace")[-2000:]
        sys.exit(f"{self.engine}: {why}: {shlex.join(self.argv)}\n{tail}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- one streaming request -------------------------------------------------

def stream_completion(port, body, start_gate, timeout):
    """Sends one streaming completion once `start_gate` opens; returns its
    timings (perf_counter seconds) and token counts."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    payload = json.dumps(body).encode()
    start_gate.wait()
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    first = last = None
    chunks, usage_tokens, text = 0, None, []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if event.get("usage"):
            usage_tokens = event["usage"].get("completion_tokens")
        for choice in event.get("choices") or []:
            piece = choice.get("text") or ""
            if piece or choice.get("tokens"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
                text.append(piece)
    done = time.perf_counter()
    conn.close()
    if first is None:
        raise RuntimeError("stream ended without any generated text")
    tokens = usage_tokens if usage_tokens is not None else chunks
    return {"sent": sent, "first": first, "last": last, "done": done,
            "tokens": tokens, "chunks": chunks, "usage": usage_tokens is not None,
            "text": "".join(text)}


def burst(port, n, args, timeout=600):
    """N concurrent streaming requests; returns (per-request results, aggregate tok/s)."""
    body = {"model": "bench", "prompt": args.prompt, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    gate = threading.Event()
    results, errors = [None] * n, []

    def worker(i):
        try:
            results[i] = stream_completion(port, body, gate, timeout)
        except Exception as e:  # reported after all threads finish
            errors.append(f"request {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # let every thread reach the gate
    gate.set()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    wall = max(r["done"] for r in results) - min(r["sent"] for r in results)
    return results, sum(r["tokens"] for r in results) / wall


def request_row(r):
    """The per-request numbers kept in results.jsonl."""
    span = r["last"] - r["first"]
    return {"ttft_ms": (r["first"] - r["sent"]) * 1e3,
            "decode_tok_s": (r["tokens"] - 1) / span if r["tokens"] > 1 and span > 0 else None,
            "total_s": r["done"] - r["sent"], "tokens": r["tokens"], "chunks": r["chunks"],
            "usage": r["usage"]}


def whole_request(port, max_tokens, args, timeout=600):
    """One non-streaming completion; returns (seconds, completion tokens)."""
    body = {"model": "bench", "prompt": args.prompt, "max_tokens": max_tokens,
            "temperature": args.temperature, "ignore_eos": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    took = time.perf_counter() - start
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:500]!r}")
    return took, json.loads(data)["usage"]["completion_tokens"]


def whole_request_rate(port, args):
    """Single-stream decode tok/s from non-streaming requests: long minus
    short (see the module's docstring)."""
    long, short = [], []
    for _ in range(args.whole_requests):
        long.append(whole_request(port, args.max_tokens, args))
        short.append(whole_request(port, 1, args))
    tokens = long[0][1]
    extra = statistics.median(t for t, _ in long) - statistics.median(t for t, _ in short)
    return (tokens - 1) / extra if tokens > 1 and extra > 0 else None


# --- the CLI's own single-stream rate ---------------------------------------

def cli_rate(binary, args):
    """`llama2 MODEL -n N -t TEMP -i PROMPT --device cpu --threads T`'s
    `achieved tok/s` (decode only)."""
    # -n counts positions, prompt included; a few spare covers the prompt.
    cmd = [str(binary), str(args.model), "-n", str(args.max_tokens + args.cli_prompt_slack),
           "-t", str(args.temperature), "-i", args.prompt,
           "--device", "cpu", "--threads", str(args.threads)]
    if args.cli_args:
        cmd += shlex.split(args.cli_args)
    p = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"achieved tok/s: ([0-9.]+)", p.stderr)
    if p.returncode != 0 or not m:
        sys.exit(f"CLI failed ({p.returncode}): {shlex.join(cmd)}\n{p.stderr[-1500:]}")
    return float(m.group(1))


# --- statistics and the report -----------------------------------------------

def percentile(values, q):
    """Linear-interpolated q-th percentile (0-100) of a non-empty list."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio_cell(pairs):
    """Median of per-round ratios a/b, with their range."""
    ratios = [a / b for a, b in pairs if a and b]
    if not ratios:
        return ""
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def report(rows, cli, whole, engines, levels):
    """Markdown: one line per engine and level, then our ratios."""
    med = statistics.median
    by = {}
    for row in rows:
        by.setdefault((row["engine"], row["concurrency"]), []).append(row)

    def aggregates(engine, n):
        return {row["round"]: row["aggregate_tok_s"] for row in by.get((engine, n), [])}

    def requests(engine, n):
        return [r for row in by.get((engine, n), []) for r in row["requests"]]

    out = ["| engine | concurrency | aggregate tok/s | per-stream tok/s | p50 TTFT ms "
           "| p90 TTFT ms | aggregate / own c=1 |", "|---|---|---|---|---|---|---|"]
    for engine in engines:
        for n in levels:
            agg, reqs = aggregates(engine, n), requests(engine, n)
            if not agg:
                continue
            ttft = [r["ttft_ms"] for r in reqs]
            rates = [r["decode_tok_s"] for r in reqs if r["decode_tok_s"]]
            single = aggregates(engine, 1)
            scale = ratio_cell([(agg[k], single[k]) for k in agg if k in single]) \
                if single and n != 1 else ""
            out.append(f"| {engine} | {n} | {med(agg.values()):,.1f} | "
                       f"{med(rates):,.1f} | {percentile(ttft, 50):,.1f} | "
                       f"{percentile(ttft, 90):,.1f} | {scale} |")
    if cli:
        out.append(f"| ours CLI | 1 | | {med(cli.values()):,.1f} | | | |")

    if OURS in engines and LLAMA_SERVER in engines:
        out += ["", "| concurrency | aggregate ours / llama-server | per-stream ours / llama-server "
                "| p50 TTFT ours / llama-server |", "|---|---|---|---|"]
        for n in levels:
            a, b = aggregates(OURS, n), aggregates(LLAMA_SERVER, n)
            pairs = [(a[k], b[k]) for k in a if k in b]
            if not pairs:
                continue

            def per_round(engine, key, stat):
                vals = {}
                for row in by[(engine, n)]:
                    xs = [r[key] for r in row["requests"] if r[key]]
                    vals[row["round"]] = stat(xs) if xs else None
                return vals

            sa, sb = per_round(OURS, "decode_tok_s", med), per_round(LLAMA_SERVER, "decode_tok_s", med)
            ta = per_round(OURS, "ttft_ms", lambda xs: percentile(xs, 50))
            tb = per_round(LLAMA_SERVER, "ttft_ms", lambda xs: percentile(xs, 50))
            out.append(f"| {n} | {ratio_cell(pairs)} | "
                       f"{ratio_cell([(sa[k], sb[k]) for k in sa if k in sb])} | "
                       f"{ratio_cell([(ta[k], tb[k]) for k in ta if k in tb])} |")
    if cli and (OURS, 1) in by:
        single = {row["round"]: med([r["decode_tok_s"] for r in row["requests"]
                                     if r["decode_tok_s"]]) for row in by[(OURS, 1)]}
        out += ["", f"single-stream server / CLI decode, by the streaming client's clock: "
                f"{ratio_cell([(single[k], cli[k]) for k in single if k in cli])}"]
    if cli and whole:
        out += [f"single-stream server / CLI decode, non-streaming (long minus short "
                f"request, median {med(whole.values()):,.1f} tok/s): "
                f"{ratio_cell([(whole[k], cli[k]) for k in whole if k in cli])}"]
    return "\n".join(out)


# --- main ---------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", help="our server command (template) or the llama2 binary")
    ap.add_argument("--llama-server", help="llama-server command (template) or its binary")
    ap.add_argument("--cli", type=Path, help="llama2 binary: also time the CLI single-stream")
    ap.add_argument("--cli-args", help="extra arguments for the --cli run (e.g. a tokenizer)")
    ap.add_argument("--cli-prompt-slack", type=int, default=16,
                    help="positions added to --max-tokens for the CLI's -n (the prompt)")
    ap.add_argument("--whole-requests", type=int, default=5,
                    help="with --cli: non-streaming requests of each length per round (default 5)")
    ap.add_argument("--model", type=Path, help="GGUF file both servers load ({model})")
    ap.add_argument("--concurrency", default="1,16",
                    type=lambda s: [int(x) for x in s.split(",")],
                    help="comma-separated concurrent-stream counts (default 1,16)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--prompt", default="Once upon a time, there was a little girl named Lily.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads per engine (default 2)")
    ap.add_argument("--ctx", type=int, default=256,
                    help="per-stream context for the default llama-server -c (default 256)")
    ap.add_argument("--startup-timeout", type=float, default=120)
    ap.add_argument("--work", type=Path, default=Path("bench-serve-work"))
    args = ap.parse_args()

    engines = {name: cmd for name, cmd in [(OURS, args.ours), (LLAMA_SERVER, args.llama_server)]
               if cmd}
    if not engines and not args.cli:
        sys.exit("nothing to time: give --ours, --llama-server and/or --cli")
    if args.cli and not args.model:
        sys.exit("--cli needs --model")
    args.work.mkdir(parents=True, exist_ok=True)
    raw = open(args.work / "results.jsonl", "a")
    rows, cli, whole = [], {}, {}
    load_before = os.getloadavg()
    for rnd in range(args.rounds):
        order = list(engines) if rnd % 2 == 0 else list(engines)[::-1]
        for engine in order:
            server = Server(engine, engines[engine], args, args.work / f"{engine}.log")
            try:
                server.wait_healthy(args.startup_timeout)
                burst(server.port, 1, args)  # warm-up, untimed
                for n in args.concurrency:
                    results, aggregate = burst(server.port, n, args)
                    row = {"engine": engine, "round": rnd, "concurrency": n,
                           "max_tokens": args.max_tokens, "aggregate_tok_s": aggregate,
                           "requests": [request_row(r) for r in results],
                           "sample_text": results[0]["text"][:200], "argv": server.argv}
                    rows.append(row)
                    raw.write(json.dumps(row) + "\n")
                    raw.flush()
                    rates = [r["decode_tok_s"] for r in row["requests"] if r["decode_tok_s"]]
                    print(f"round {rnd} {engine} c={n}: {aggregate:,.1f} tok/s aggregate, "
                          f"{statistics.median(rates):,.1f} per stream", file=sys.stderr)
                if args.cli and engine == OURS:
                    whole[rnd] = whole_request_rate(server.port, args)
                    raw.write(json.dumps({"engine": engine, "round": rnd, "concurrency": 1,
                                          "non_streaming_decode_tok_s": whole[rnd]}) + "\n")
                    print(f"round {rnd} {engine} non-streaming: {whole[rnd] or 0:,.1f} tok/s",
                          file=sys.stderr)
            finally:
                server.stop()
        if args.cli:
            cli[rnd] = cli_rate(args.cli, args)
            raw.write(json.dumps({"engine": "ours CLI", "round": rnd, "concurrency": 1,
                                  "decode_tok_s": cli[rnd]}) + "\n")
            print(f"round {rnd} ours CLI: {cli[rnd]:,.1f} tok/s", file=sys.stderr)
    raw.close()
    load = " / ".join(f"{a:.2f}" for a in (load_before[0], os.getloadavg()[0]))
    print(f"{args.rounds} rounds, max_tokens {args.max_tokens}, {args.threads} threads, "
          f"1-minute load average before / after: {load}\n")
    whole = {k: v for k, v in whole.items() if v}
    print(report(rows, cli, whole, list(engines), args.concurrency))


if __name__ == "__main__":
    main()
