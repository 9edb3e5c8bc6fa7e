#!/usr/bin/env bash
# A library consumer's first project: a new cargo package outside the workspace that depends
# on the facade by path and holds only the first example of crates/ember/README.md. It must
# build and print generated text for SmolLM2.
#
# It shares the workspace's lockfile and target directory (and its release profile), so only
# what differs is rebuilt.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/src"
cat > "$dir/Cargo.toml" <<TOML
[package]
name = "ember-consumer"
version = "0.1.0"
edition = "2024"
publish = false

[dependencies]
ember = { path = "$root/crates/ember" }

[profile.release]
debug = 1
TOML
# The README's first ```rust block, verbatim.
awk '/^```rust$/ { inside = 1; next } /^```$/ { if (inside) exit } inside' \
    "$root/crates/ember/README.md" > "$dir/src/main.rs"
test -s "$dir/src/main.rs"
cp "$root/Cargo.lock" "$dir/Cargo.lock"
cd "$dir"
CARGO_TARGET_DIR="$root/target" cargo build --release --offline 2>&1 | tail -n 3
out=$(CARGO_TARGET_DIR="$root/target" cargo run --release --offline -q)
echo "$out"
# SmolLM2 answers with its greedy continuation; anything printed at all is a pass only if it
# has words in it.
if ! printf '%s' "$out" | grep -q '[A-Za-z]'; then
    echo "the consumer project printed no text" >&2
    exit 1
fi
