#!/usr/bin/env bash
# Runs every example of the facade crate (`crates/ember/examples/`) on the real SmolLM2, so
# they cannot rot: each must exit 0 and print something. `cargo test` has built them already.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p ember --examples
for example in crates/ember/examples/*.rs; do
    name=$(basename "$example" .rs)
    echo "-- example $name"
    out=$("./target/release/examples/$name")
    if [ -z "$out" ]; then
        echo "example $name printed nothing" >&2
        exit 1
    fi
    printf '%s\n' "$out" | head -n 8
done
