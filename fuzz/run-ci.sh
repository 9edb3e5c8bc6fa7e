#!/usr/bin/env bash
# Runs every fuzz target in fuzz/Cargo.toml for a bounded time on its committed seeds, with the
# stable toolchain and without cargo-fuzz: the crate is built with the flags cargo-fuzz passes
# (libFuzzer's SanitizerCoverage instrumentation, `--cfg fuzzing`, debug assertions and overflow
# checks; no AddressSanitizer, which needs nightly) and the binaries are run directly.
# Any crash, panic, timeout or out-of-memory stops the run with a non-zero exit; the input that
# caused it is kept in fuzz/artifacts/<target>/ (reproduce: fuzz/target/.../release/<target> FILE).
#
# Environment (all optional):
#   FUZZ_SECONDS=60         time per target (libFuzzer's -max_total_time)
#   FUZZ_TARGETS="a b"      run only these targets (default: every [[bin]] in fuzz/Cargo.toml)
#   FUZZ_RSS_LIMIT_MB=2048  a run whose RSS passes this fails (-rss_limit_mb)
#   FUZZ_MALLOC_LIMIT_MB=   a single allocation past this fails (-malloc_limit_mb; default: the
#                           RSS limit)
#   FUZZ_INPUT_TIMEOUT=10   seconds one input may take before it counts as a hang (-timeout)
#   FUZZ_TARGET_DIR=fuzz/target  cargo's target directory (kept apart from the workspace's:
#                           the instrumented build must not mix with normal artifacts)
# A target's dictionary is fuzz/<target>.dict, else fuzz/<first word of target>.dict
# (gguf_reader -> gguf.dict); its seeds are fuzz/seeds/<target>/ (a target without seeds starts
# from an empty corpus, with a warning).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-60}
rss_limit=${FUZZ_RSS_LIMIT_MB:-2048}
malloc_limit=${FUZZ_MALLOC_LIMIT_MB:-$rss_limit}
input_timeout=${FUZZ_INPUT_TIMEOUT:-10}
target_dir=${FUZZ_TARGET_DIR:-$PWD/target}
host=$(rustc -vV | sed -n 's/^host: //p')

# The [[bin]] names, in file order: `name = "..."` lines inside [[bin]] tables only.
all_targets=$(awk '
    /^\[\[bin\]\]/ { in_bin = 1; next }
    /^\[/          { in_bin = 0 }
    in_bin && /^[[:space:]]*name[[:space:]]*=/ {
        sub(/^[^=]*=[[:space:]]*"/, ""); sub(/".*/, ""); print
    }' Cargo.toml)
targets=${FUZZ_TARGETS:-$all_targets}
if [ -z "$targets" ]; then
    echo "fuzz/run-ci.sh: no [[bin]] targets found in fuzz/Cargo.toml" >&2
    exit 1
fi
for t in $targets; do
    if ! grep -qx "$t" <<<"$all_targets"; then
        echo "fuzz/run-ci.sh: FUZZ_TARGETS names '$t', which is not a [[bin]] in fuzz/Cargo.toml" \
            "(targets: $(echo $all_targets))" >&2
        exit 1
    fi
done

# cargo-fuzz's flags (`cargo fuzz build -a` on Linux, minus -Zsanitizer). `--target` keeps them
# off build scripts and proc macros, which must not be instrumented.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions -Coverflow-checks ${RUSTFLAGS:-}"

echo "== fuzz: building $(echo $targets) (stable, libFuzzer instrumentation)"
start=$SECONDS
bins=()
for t in $targets; do bins+=(--bin "$t"); done
cargo build --release --locked --target "$host" --target-dir "$target_dir" "${bins[@]}"
echo "== fuzz: build took $((SECONDS - start)) s"

failed=()
for t in $targets; do
    bin="$target_dir/$host/release/$t"
    corpus="corpus/$t"
    artifacts="artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    args=(-max_total_time="$seconds" -rss_limit_mb="$rss_limit" -malloc_limit_mb="$malloc_limit"
        -timeout="$input_timeout" -print_final_stats=1 -artifact_prefix="$artifacts/")
    for dict in "$t.dict" "${t%%_*}.dict"; do
        if [ -f "$dict" ]; then
            args+=(-dict="$dict")
            break
        fi
    done
    dirs=("$corpus")
    if [ -d "seeds/$t" ]; then
        dirs+=("seeds/$t")
    else
        echo "warning: no seeds in fuzz/seeds/$t: starting from an empty corpus" >&2
    fi
    echo "== fuzz: $t for ${seconds} s"
    # New inputs go to corpus/<target> (git-ignored); seeds/ is only read.
    if "$bin" "${args[@]}" "${dirs[@]}" 2>"$artifacts/log.txt"; then
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+.*DONE)' \
            "$artifacts/log.txt" || true
    else
        echo "!! fuzz target $t failed; the end of its log (full log: fuzz/$artifacts/log.txt):" >&2
        tail -n 60 "$artifacts/log.txt" >&2
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz/run-ci.sh: FAILED: ${failed[*]} (crashing inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "== fuzz: all targets ran ${seconds} s without a crash: $(echo $targets)"
