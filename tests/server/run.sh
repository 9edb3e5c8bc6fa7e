#!/usr/bin/env bash
# Real-client tests of `ember serve`: the official openai and ollama Python packages against a
# server on a loopback port. Needs the release binary (EMBER_BIN, default target/release/ember).
# Exits non-zero when a test fails or when no test ran.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# No __pycache__ left in the tree.
export PYTHONDONTWRITEBYTECODE=1
export EMBER_BIN="${EMBER_BIN:-$root/target/release/ember}"
if [[ ! -x "$EMBER_BIN" ]]; then
    echo "tests/server: $EMBER_BIN is missing: build it with cargo build --release -p ember-cli" >&2
    exit 1
fi
# Install the pinned clients only when something is missing or at another version.
if ! python3 - "$here/requirements.txt" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, want = line.split("==")
        if version(name) != want:
            sys.exit(1)
PY
then
    python3 -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
fi
cd "$here"
exec python3 -m pytest -q -p no:cacheprovider "$@" test_server.py
