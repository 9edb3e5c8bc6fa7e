#!/usr/bin/env bash
# The whole test suite: every Rust test (release mode: the numeric tests run a real model),
# then the real-client tests of `ember serve` (official openai and ollama Python packages).
# Tests that need a real model pull it on first use (ember-hub), as the CLI does.
set -euo pipefail
cd "$(dirname "$0")/.."
# gguf-py (llama.cpp's own GGUF reader, numpy only) reads back every GGUF ember-convert writes.
python3 -m pip install --quiet --disable-pip-version-check gguf==0.19.0
EMBER_REQUIRE_GGUF_PY=1 cargo test --release --workspace
# `cargo test` built target/release/ember for the CLI tests; the server tests drive it.
cargo build --release -p ember-cli
bash tests/server/run.sh
