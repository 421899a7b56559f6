#!/usr/bin/env bash
# Runs the cargo-fuzz targets in broker/fuzz (libFuzzer) over the broker's parsers: AMQP frames
# with method and content-header decoding, SASL responses, message-store records, message-log
# recovery, metadata snapshot and journal, link URIs (see broker/src/fuzzing.rs).
#
#   scripts/fuzz.sh                  CI form: each target FUZZ_SECONDS (30) seconds
#   scripts/fuzz.sh --long [HOURS]   each target for HOURS (default 1) hours, corpus kept
#                                    in $FUZZ_CACHE/corpus/<target> between runs
#   scripts/fuzz.sh [--long] TARGET...   only these targets
#   FUZZ_SEED=N scripts/fuzz.sh      the same libFuzzer seed again (the seed is printed)
#
# The committed corpus (broker/fuzz/corpus/<target>) is read, never written: new inputs go
# to a temporary directory (CI form) or the cache (--long). A crash leaves its input in
# broker/fuzz/artifacts/<target>/ and fails the run; fix the broker, then commit the input
# to the corpus (the stable test `fuzzing::tests::corpus_replays` replays it from then on).
#
# Needs cargo-fuzz and a nightly toolchain: both are installed if missing (cargo-fuzz into
# $FUZZ_CACHE/cargo-fuzz from crates.io, nightly through rustup); without a nightly the
# stable toolchain is used with RUSTC_BOOTSTRAP=1. The build lives in $FUZZ_CACHE/fuzz-target
# outside the checkout, so CI rebuilds only what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

ALL_TARGETS=(frames sasl store_record log_recovery metadata link_uri)
FUZZ_CACHE="${FUZZ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/warren}"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-30}"
LONG=0
TARGETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --long)
            LONG=1
            if [[ "${2:-}" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
                SECONDS_PER_TARGET=$(awk -v h="$2" 'BEGIN { printf "%d", h * 3600 }')
                shift
            else
                SECONDS_PER_TARGET=3600
            fi
            ;;
        -h | --help)
            sed -n '2,21p' "$0"
            exit 0
            ;;
        *) TARGETS+=("$1") ;;
    esac
    shift
done
CHOSEN="${TARGETS[*]:-}"
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
    [ -d "broker/fuzz/corpus/$t" ] || { echo "unknown fuzz target '$t' (${ALL_TARGETS[*]})" >&2; exit 2; }
done

# --- tools -----------------------------------------------------------------------------
export PATH="$FUZZ_CACHE/cargo-fuzz/bin:$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==== cargo install cargo-fuzz (into $FUZZ_CACHE/cargo-fuzz) ===="
    cargo install cargo-fuzz --locked --root "$FUZZ_CACHE/cargo-fuzz"
fi
TOOLCHAIN=()
if command -v rustup >/dev/null 2>&1; then
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        echo "==== rustup toolchain install nightly ===="
        rustup toolchain install nightly --profile minimal || true
    fi
    if rustup run nightly rustc --version >/dev/null 2>&1; then
        TOOLCHAIN=(+nightly)
    fi
fi
if [ ${#TOOLCHAIN[@]} -eq 0 ]; then
    # cargo-fuzz passes nightly-only flags (-Z, sanitizer coverage); stable takes them so.
    echo "no nightly toolchain: using $(rustc --version) with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
fi
echo "$(cargo "${TOOLCHAIN[@]}" --version), $(cargo fuzz --version)"

# The fuzz build has flags of its own: never share the main target dir (each would rebuild
# the other's artefacts).
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$FUZZ_CACHE/fuzz-target}"
# Optimised, with debug assertions and overflow checks. No sanitizer by default: the broker
# forbids unsafe code, so what fuzzing finds is panics, overflows, stack overflows, runaway
# memory and time, which libFuzzer catches without one (FUZZ_SANITIZER=address for more).
BUILD_FLAGS=(-O -a -s "${FUZZ_SANITIZER:-none}" --fuzz-dir "$ROOT/broker/fuzz")

SEED="${FUZZ_SEED:-$(( $(od -An -N4 -tu4 /dev/urandom) % 2147483647 + 1 ))}"
# The same seed, build and corpus replay the same inputs (a run bounded by time may get
# further or less far); a crash's own input, saved in artifacts/, is the exact reproduction.
echo "fuzz seed: $SEED (replay: FUZZ_SEED=$SEED scripts/fuzz.sh${CHOSEN:+ $CHOSEN})"

start=$(date +%s)
echo "==== cargo fuzz build (CARGO_TARGET_DIR=$CARGO_TARGET_DIR) ===="
(cd broker && cargo "${TOOLCHAIN[@]}" fuzz build "${BUILD_FLAGS[@]}")
echo "fuzz build took $(( $(date +%s) - start )) s"

failed=()
for t in "${TARGETS[@]}"; do
    if [ "$LONG" = 1 ]; then
        corpus="$FUZZ_CACHE/corpus/$t"
        mkdir -p "$corpus"
    else
        corpus=$(mktemp -d)
    fi
    artifacts="$ROOT/broker/fuzz/artifacts/$t"
    mkdir -p "$artifacts"
    echo "==== fuzz $t: ${SECONDS_PER_TARGET} s ===="
    # libFuzzer prints a status line per new coverage: keep the log, show its end.
    log=$(mktemp)
    if (cd broker && cargo "${TOOLCHAIN[@]}" fuzz run "${BUILD_FLAGS[@]}" "$t" \
        "$corpus" "$ROOT/broker/fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -seed="$SEED" -timeout=10 \
        -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="$artifacts/") >"$log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb)' "$log" || tail -n 3 "$log"
    else
        # The panic (or libFuzzer's verdict) and where the input went.
        grep -E -A4 "panicked at|ERROR: libFuzzer|SUMMARY" "$log" | cut -c1-600 | head -n 40
        grep -E "^(Failing input|	fuzz/artifacts)" "$log" || true
        echo "!!!! fuzz target $t failed; input in $artifacts/"
        echo "     replay: (cd broker && cargo ${TOOLCHAIN[*]} fuzz run ${BUILD_FLAGS[*]} $t <artifact>)"
        failed+=("$t")
    fi
    rm -f "$log"
    [ "$LONG" = 1 ] || rm -rf "$corpus"
done
echo "fuzzing took $(( $(date +%s) - start )) s (seed $SEED)"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz targets failed: ${failed[*]}" >&2
    exit 1
fi
