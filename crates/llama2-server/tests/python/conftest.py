"""Shared fixtures for the Python end-to-end tests of `llama2 serve`.

The tests talk to a server over HTTP and never import its code, so they run
the same against a server someone started by hand (set LLAMA2_SERVER_URL,
e.g. http://127.0.0.1:8080, and LLAMA2_API_KEY if it has a key) as against
the one this file starts itself when LLAMA2_SERVER_URL is unset:

    target/release/llama2 serve ../shared/models/stories260K.bin \
        -z ../shared/models/tok512.bin --port <free port>

run from the repository root (build it first: cargo build --release).
LLAMA2_BIN overrides the binary's path. The self-started server gets
LLAMA2_API_KEY as its --api-key when that is set.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

# crates/llama2-server/tests/python/conftest.py -> repository root
REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_BIN = REPO_ROOT / "target" / "release" / "llama2"
# Relative to REPO_ROOT, as the README writes them.
MODEL = "../shared/models/stories260K.bin"
TOKENIZER = "../shared/models/tok512.bin"

# The model answers in milliseconds; loading is what can take a while.
STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    # Racy in principle (the port is released before the server binds it),
    # but on a test machine nothing else is grabbing loopback ports.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `llama2 serve` child process, with its output kept in a log file
    so a failure to start can say why."""

    def __init__(self, api_key: str | None, extra_args: tuple[str, ...] = ()):
        binary = Path(os.environ.get("LLAMA2_BIN", DEFAULT_BIN))
        if not binary.exists():
            pytest.fail(
                f"{binary} not found: build it (cargo build --release) or point "
                "LLAMA2_SERVER_URL at a running server",
                pytrace=False,
            )
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(binary), "serve", MODEL, "-z", TOKENIZER,
               "--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ)
        # The server also reads LLAMA2_API_KEY itself; make the key we want the
        # only one in play so a stray variable cannot change the test's setup.
        env.pop("LLAMA2_API_KEY", None)
        if api_key:
            cmd += ["--api-key", api_key]
        cmd += list(extra_args)
        self.log = tempfile.NamedTemporaryFile(prefix="llama2-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        self._wait_healthy()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = Path(self.log.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"llama2 serve exited with {self.proc.returncode} before becoming "
                            f"healthy; log {self.log.name}:\n{self.log_tail()}", pytrace=False)
            try:
                r = httpx.get(f"{self.url}/health", timeout=2.0)
                # 503 {"status":"loading"} is expected while the model loads.
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"llama2 serve not healthy after {STARTUP_TIMEOUT_S:.0f}s (last: {last}); "
                    f"log {self.log.name}:\n{self.log_tail()}", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


def _external_url() -> str | None:
    url = os.environ.get("LLAMA2_SERVER_URL", "").strip()
    return url.rstrip("/") or None


@pytest.fixture(scope="session")
def api_key() -> str | None:
    """The key the server under test expects, or None when it has none."""
    return os.environ.get("LLAMA2_API_KEY") or None


@pytest.fixture(scope="session")
def server_url(api_key):
    """Base URL (no trailing slash, no /v1) of the server under test."""
    url = _external_url()
    if url:
        yield url
        return
    server = ServerProcess(api_key)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def keyed_server(server_url, api_key):
    """(url, key) of a server that requires a key, for the 401 tests.

    The main server when it has a key; otherwise, when this session starts
    servers itself, a second one with a random key; otherwise skip (an
    external server without a key cannot show a 401).
    """
    if api_key:
        yield server_url, api_key
        return
    if _external_url():
        pytest.skip("LLAMA2_SERVER_URL has no LLAMA2_API_KEY: nothing to reject")
    key = "test-" + secrets.token_hex(8)
    server = ServerProcess(key)
    try:
        yield server.url, key
    finally:
        server.stop()


@pytest.fixture(scope="session")
def auth_headers(api_key) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


@pytest.fixture(scope="session")
def http(server_url, auth_headers):
    """A plain httpx client for the raw-HTTP tests (status codes, SSE bytes)."""
    with httpx.Client(base_url=server_url, headers=auth_headers, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="session")
def model_id(http) -> str:
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["id"]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (labels as written)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


@pytest.fixture
def metrics(http):
    """Call it to fetch and parse GET /metrics."""
    def fetch() -> dict[str, float]:
        r = http.get("/metrics")
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)
    return fetch
