"""The server's life cycle, each test on a server of its own with the flags
it needs: a full queue answers 429, SIGTERM lets running streams finish
and refuses new requests, and the process then exits cleanly."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest

from conftest import ServerProcess, _external_url

pytestmark = pytest.mark.skipif(
    _external_url() is not None, reason="starts servers of its own (LLAMA2_SERVER_URL is set)"
)

# A long answer: the whole context of stories260K after a short prompt.
LONG = {"prompt": "Once upon a time", "max_tokens": 500, "temperature": 1.0,
        "seed": 5, "ignore_eos": True}


def test_full_queue_answers_429():
    server = ServerProcess(None, ("--parallel", "1", "--max-queue", "1"))
    try:
        barrier = threading.Barrier(10)
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def client():
            barrier.wait()
            r = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=60)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=client) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        codes = sorted(r.status_code for r in results)
        assert len(codes) == 10 and set(codes) <= {200, 429}, codes
        assert 200 in codes and 429 in codes, codes
        refused = next(r for r in results if r.status_code == 429)
        assert refused.json()["error"]["type"] == "rate_limit_error", refused.text
        # The refused ones left nothing behind: the server still answers.
        assert httpx.post(f"{server.url}/v1/completions", json={**LONG, "max_tokens": 4},
                          timeout=30).status_code == 200
    finally:
        server.stop()


def test_sigterm_finishes_running_streams_then_exits():
    server = ServerProcess(None, ("--shutdown-grace", "20"))
    try:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", f"{server.url}/v1/completions",
                          json={**LONG, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert first != "data: [DONE]"
                os.kill(server.proc.pid, signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest and rest[-1] == "data: [DONE]", rest[-3:]
        assert '"finish_reason":"length"' in rest[-2] or '"finish_reason": "length"' in rest[-2], rest[-2]
        assert server.proc.wait(timeout=20) == 0, server.log_tail()
        assert "shutting down" in server.log_tail()
    finally:
        server.stop()


def test_a_model_that_fails_to_load_ends_the_server(tmp_path):
    import subprocess
    from conftest import DEFAULT_BIN, REPO_ROOT, TOKENIZER, _free_port

    broken = tmp_path / "truncated.bin"
    broken.write_bytes((REPO_ROOT / "../shared/models/stories260K.bin").read_bytes()[:1000])
    binary = os.environ.get("LLAMA2_BIN", str(DEFAULT_BIN))
    p = subprocess.run([binary, "serve", str(broken), "-z", TOKENIZER, "--port", str(_free_port())],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p.stderr
    assert "cannot load" in p.stderr and "truncated" in p.stderr, p.stderr
