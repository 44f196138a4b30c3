"""Faults, load and raw HTTP: what a misbehaving or impatient client does to
the server, and what an operator sees (/health, /metrics).

Raw httpx (and curl) rather than the openai client, so the tests see the
exact status codes, headers and SSE bytes. Every test is bounded: a hung
server fails a test within ~30 s instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time

import httpx
import pytest

PROMPTS = ["Once upon a time", "The little dog", "Lily went to the park", "One day, a bird"]
TEST_BUDGET_S = 30.0


def sse_payloads(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order. Also checks framing:
    every event is a data line followed by a blank line."""
    payloads = []
    for event in raw.replace("\r\n", "\n").split("\n\n"):
        if not event.strip():
            continue
        data = [line[5:].strip() for line in event.split("\n") if line.startswith("data:")]
        others = [line for line in event.split("\n") if line and not line.startswith(("data:", ":", "event:", "id:"))]
        assert not others, f"malformed SSE event {event!r}"
        if data:
            payloads.append("\n".join(data))
    return payloads


def check_stream(raw: str, chat: bool) -> tuple[str, str]:
    """Asserts a complete, well-formed stream; returns (text, finish_reason)."""
    payloads = sse_payloads(raw)
    assert payloads, f"empty stream: {raw[:300]!r}"
    assert payloads[-1] == "[DONE]", f"stream does not end with [DONE]: {raw[-300:]!r}"
    assert payloads.count("[DONE]") == 1
    text, finish = "", None
    for p in payloads[:-1]:
        chunk = json.loads(p)
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            text += (choice["delta"].get("content") or "") if chat else (choice.get("text") or "")
            finish = choice.get("finish_reason") or finish
    assert finish in ("length", "stop"), f"no finish_reason in {payloads[-3:]}"
    return text, finish


def metric(values: dict[str, float], name: str) -> float:
    """Sum of every series of `name` (labels ignored)."""
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def assert_error_body(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]!r}"
    try:
        body = r.json()
    except ValueError:
        pytest.fail(f"{status} body is not JSON: {r.text[:300]!r}")
    assert isinstance(body.get("error"), dict), body
    assert body["error"].get("message"), body


# ---------------------------------------------------------------- load


def test_concurrent_streams(server_url, auth_headers, http):
    """16 streams at once all complete, and batching them changes nothing:
    each greedy answer equals the same request made alone."""
    clients = 16
    body = lambda i: {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 48, "temperature": 0,
                      "stream": True, "ignore_eos": True}
    solo = {}
    for p in PROMPTS:
        r = http.post("/v1/completions", json={**body(PROMPTS.index(p)), "stream": False})
        assert r.status_code == 200, r.text
        solo[p] = r.json()["choices"][0]["text"]

    async def one(client, i):
        async with client.stream("POST", "/v1/completions", json=body(i)) as r:
            assert r.status_code == 200, (await r.aread()).decode()
            assert r.headers["content-type"].startswith("text/event-stream")
            return i, (await r.aread()).decode()

    async def main():
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=server_url, headers=auth_headers, limits=limits,
                                     timeout=TEST_BUDGET_S) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(clients))),
                                          TEST_BUDGET_S - 5)

    results = asyncio.run(main())
    assert len(results) == clients
    for i, raw in results:
        text, finish = check_stream(raw, chat=False)
        assert finish == "length"
        assert text == solo[PROMPTS[i % len(PROMPTS)]], f"client {i}: batched text differs from solo"


def test_concurrent_chat_streams(server_url, auth_headers):
    clients = 16

    async def one(client, i):
        payload = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                   "max_tokens": 32, "temperature": 1.0, "seed": i, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
            assert r.status_code == 200, (await r.aread()).decode()
            return (await r.aread()).decode()

    async def main():
        async with httpx.AsyncClient(base_url=server_url, headers=auth_headers,
                                     limits=httpx.Limits(max_connections=clients),
                                     timeout=TEST_BUDGET_S) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(clients))),
                                          TEST_BUDGET_S - 5)

    for raw in asyncio.run(main()):
        check_stream(raw, chat=True)


def wait_idle(metrics, timeout_s: float = 10.0) -> dict[str, float]:
    """Polls /metrics until no sequence runs and no KV block is held."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics()
        if metric(m, "llama2_running_sequences") == 0 and metric(m, "llama2_kv_blocks_used") == 0:
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle after {timeout_s:.0f} s: running_sequences="
                        f"{metric(m, 'llama2_running_sequences')}, kv_blocks_used="
                        f"{metric(m, 'llama2_kv_blocks_used')}, queue_depth={metric(m, 'llama2_queue_depth')}")
        time.sleep(0.2)


def test_gauges_zero_when_idle(http, metrics):
    """After an ordinary request has finished the gauges say the server is
    idle: the baseline that the disconnect tests below rely on."""
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    wait_idle(metrics, timeout_s=5.0)


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_disconnect_mid_stream_frees_resources(server_url, auth_headers, http, metrics, endpoint):
    """Clients that hang up after 3 chunks must not leak sequences or KV
    blocks, and the server must keep serving."""
    clients = 8
    payload = {"max_tokens": 64, "temperature": 1.0, "stream": True, "ignore_eos": True}
    if endpoint.endswith("chat/completions"):
        payload["messages"] = [{"role": "user", "content": "Tell me a long story."}]
    else:
        payload["prompt"] = PROMPTS[0]

    async def one(i):
        # A client of its own, closed on exit: the TCP connection really goes
        # away instead of returning to a pool.
        async with httpx.AsyncClient(base_url=server_url, headers=auth_headers, timeout=20.0) as client:
            async with client.stream("POST", endpoint, json={**payload, "seed": i}) as r:
                assert r.status_code == 200, (await r.aread()).decode()
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        seen += 1
                        if seen == 3:
                            return seen
        return seen

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(clients))), 20)

    seen = asyncio.run(main())
    assert all(s >= 1 for s in seen)
    wait_idle(metrics)
    r = http.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]


def test_disconnect_before_first_token(server_url, auth_headers, http, metrics):
    """A client that sends a request and hangs up at once."""
    for i in range(8):
        with httpx.Client(base_url=server_url, headers=auth_headers, timeout=10.0) as client:
            with client.stream("POST", "/v1/completions",
                               json={"prompt": PROMPTS[0], "max_tokens": 64, "stream": True,
                                     "ignore_eos": True, "seed": i}):
                pass  # closed before reading any of the body
    wait_idle(metrics)
    assert http.get("/health").status_code == 200


def test_non_streamed_clients_that_give_up_free_resources(server_url, auth_headers, http, metrics):
    """Non-streamed requests get no bytes until they end, so the server
    notices a client that gave up only by its closed connection: sixteen
    long requests whose clients time out at once must still leave no
    sequence or KV block behind, and the server must keep answering."""
    def one(i):
        with httpx.Client(base_url=server_url, headers=auth_headers, timeout=0.05) as client:
            try:
                client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 400,
                                                     "ignore_eos": True, "seed": i})
            except httpx.TimeoutException:
                pass

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    wait_idle(metrics)
    r = http.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]


def test_slow_reader_gets_complete_stream(server_url, auth_headers, http):
    """A client reading slowly still gets every chunk, and does not hold up
    other requests while it dawdles."""
    payload = {"prompt": PROMPTS[2], "max_tokens": 32, "temperature": 0, "stream": True, "ignore_eos": True}
    reference = http.post("/v1/completions", json={**payload, "stream": False}).json()["choices"][0]["text"]
    raw: list[str] = []
    errors: list[BaseException] = []

    def slow():
        try:
            with httpx.Client(base_url=server_url, headers=auth_headers, timeout=20.0) as client:
                with client.stream("POST", "/v1/completions", json=payload) as r:
                    assert r.status_code == 200
                    for piece in r.iter_bytes(chunk_size=64):
                        raw.append(piece.decode("utf-8", errors="surrogateescape"))
                        time.sleep(0.05)
        except BaseException as e:  # re-raised in the test thread
            errors.append(e)

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    time.sleep(0.3)
    # Meanwhile a normal request goes through promptly.
    started = time.monotonic()
    r = http.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 10, "request stalled behind a slow reader"
    t.join(TEST_BUDGET_S - 5)
    assert not t.is_alive(), "slow reader never finished"
    if errors:
        raise errors[0]
    text, finish = check_stream("".join(raw), chat=False)
    assert finish == "length"
    assert text == reference


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json(http, endpoint):
    r = http.post(endpoint, content=b'{"prompt": "Once", "max_tokens": ', headers={"Content-Type": "application/json"})
    assert_error_body(r, 400)


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_wrong_field_type(http, endpoint):
    body = {"prompt": "Once", "max_tokens": "many"} if endpoint == "/v1/completions" else \
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}
    assert_error_body(http.post(endpoint, json=body), 400)


def test_body_too_large(http):
    body = json.dumps({"prompt": "a " * (3 * 1024 * 1024 // 2), "max_tokens": 4}).encode()
    assert len(body) > 3_000_000
    try:
        r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    except httpx.TransportError as e:
        pytest.fail(f"server dropped the connection instead of answering 413: {e!r}")
    assert_error_body(r, 413)
    assert http.get("/health").status_code == 200


def test_missing_prompt(http):
    assert_error_body(http.post("/v1/completions", json={"max_tokens": 4}), 400)


def test_missing_messages(http):
    assert_error_body(http.post("/v1/chat/completions", json={"max_tokens": 4}), 400)


def test_empty_messages(http):
    r = http.post("/v1/chat/completions", json={"messages": [], "max_tokens": 4})
    assert_error_body(r, 400)


def test_prompt_longer_than_context(http):
    """The model's context is 512 tokens; a longer prompt is the client's
    mistake (400), not a crash, and the server keeps going."""
    r = http.post("/v1/completions", json={"prompt": "Once upon a time " * 400, "max_tokens": 4})
    assert_error_body(r, 400)
    assert http.get("/health").status_code == 200


# ---------------------------------------------------------------- health and metrics


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_metrics(http, metrics):
    before = metrics()
    r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
                                           "ignore_eos": True})
    assert r.status_code == 200, r.text
    # Streaming too, so time-to-first-token has a reason to be observed.
    s = http.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 8, "stream": True})
    check_stream(s.text, chat=False)

    resp = http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain"), resp.headers["content-type"]
    text = resp.text
    for name in ("llama2_requests_total", "llama2_prompt_tokens_total", "llama2_generated_tokens_total",
                 "llama2_queue_depth", "llama2_running_sequences", "llama2_time_to_first_token_seconds",
                 "llama2_kv_blocks_used", "llama2_kv_blocks_total"):
        assert name in text, f"{name} missing from /metrics"
    assert "# TYPE llama2_time_to_first_token_seconds histogram" in text
    assert "llama2_time_to_first_token_seconds_bucket{" in text
    assert 'le="+Inf"' in text

    after = metrics()
    assert metric(after, "llama2_requests_total") >= metric(before, "llama2_requests_total") + 2
    assert metric(after, "llama2_generated_tokens_total") >= metric(before, "llama2_generated_tokens_total") + 8
    assert metric(after, "llama2_prompt_tokens_total") > metric(before, "llama2_prompt_tokens_total")
    assert metric(after, "llama2_time_to_first_token_seconds_count") > \
        metric(before, "llama2_time_to_first_token_seconds_count")
    assert metric(after, "llama2_kv_blocks_total") > 0
    assert any(k.startswith("llama2_requests_total{") and 'endpoint=' in k and 'status=' in k for k in after), \
        "llama2_requests_total has no endpoint/status labels"


# ---------------------------------------------------------------- curl


def curl(server_url, auth_headers, path, body) -> str:
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    cmd = ["curl", "-sN", "--max-time", "20", "-H", "Content-Type: application/json"]
    for k, v in auth_headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd += ["-d", json.dumps(body), f"{server_url}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=25)
    assert out.returncode == 0, f"curl exited {out.returncode}: {out.stderr}"
    return out.stdout


def test_curl_non_stream(server_url, auth_headers):
    out = curl(server_url, auth_headers, "/v1/chat/completions",
               {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "temperature": 0})
    body = json.loads(out)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]


def test_curl_stream(server_url, auth_headers):
    out = curl(server_url, auth_headers, "/v1/completions",
               {"prompt": "Once upon a time", "max_tokens": 16, "stream": True})
    assert out.rstrip().endswith("data: [DONE]"), out[-300:]
    check_stream(out, chat=False)


def test_no_max_tokens_runs_to_the_context(http):
    # The server's default max_tokens is the rest of the context; the KV
    # reservation for it must not overflow.
    r = http.post("/v1/completions", json={"prompt": "Once", "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 512, usage
    assert r.json()["choices"][0]["finish_reason"] == "length"
