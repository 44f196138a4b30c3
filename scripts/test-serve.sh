#!/usr/bin/env bash
# End-to-end tests of `llama2 serve` with real clients: the official
# `openai` Python package, httpx fault and load tests, curl, and the chat
# page in Debian's headless Chromium (selenium + chromedriver). The Python
# packages go into .venv-serve/ (once); Chromium comes from apt-get when it
# is missing (the page tests say SKIPPED when it cannot be installed).
# The tests start the server themselves on a free loopback port, on
# stories260K, with the binary at $LLAMA2_BIN (default: the debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
tests=crates/llama2-server/tests/python
if [ ! -x .venv-serve/bin/python ]; then
    python3 -m venv .venv-serve
    .venv-serve/bin/pip install --quiet --disable-pip-version-check -r "$tests/requirements.txt"
fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v curl >/dev/null; then
    if command -v apt-get >/dev/null; then
        log=$(mktemp)
        { apt-get install -y -q chromium chromium-driver curl ||
            { apt-get update -q && apt-get install -y -q chromium chromium-driver curl; }; } >"$log" 2>&1 ||
            echo "SKIPPED page tests: apt-get could not install chromium (see $log)"
    else
        echo "SKIPPED page tests: no apt-get to install chromium"
    fi
fi
export LLAMA2_BIN=${LLAMA2_BIN:-$PWD/target/debug/llama2}
[ -x "$LLAMA2_BIN" ] || cargo build -p llama2-cli
.venv-serve/bin/python -m pytest "$tests" -q -p no:cacheprovider -rs
