#!/usr/bin/env bash
# Fuzzes everything a guest or a user controls (fuzz/fuzz_targets: config parsers, legacy device
# registers, virtio-blk request parsing and queue processing, virtio-vsock packets and host
# sockets, the virtio-mmio register file, the kernel/initramfs loader) with cargo-fuzz
# (libFuzzer + AddressSanitizer), each for a bounded time, after replaying the inputs in
# fuzz/regressions/TARGET (earlier crashes, kept as tests).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 20 s, every target
#
# Prints executions and crashes per target; exits non-zero if any target crashed (the crashing
# input is left in fuzz/artifacts/; copy it to fuzz/regressions/TARGET/ once fixed). The corpus
# grows in fuzz/corpus/ (not in git). cargo-fuzz needs nightly-only rustc flags: RUSTC_BOOTSTRAP=1
# lets the stable toolchain accept them. Installs cargo-fuzz (crates.io) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

secs=${1:-${EMBER_FUZZ_SECONDS:-20}}
shift || true
export RUSTC_BOOTSTRAP=1
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (once)"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --quiet
fi

cd fuzz
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

t0=$(date +%s)
# -O: optimised, with debug assertions on. No target named builds them all at once.
build_failed() {
    cat build.log >&2
    echo "fuzz: FAILED to build the fuzz targets" >&2
    exit 1
}
: >build.log
if [ $# -gt 0 ]; then
    for t in "${targets[@]}"; do
        cargo fuzz build -O "$t" >/dev/null 2>>build.log || build_failed
    done
else
    cargo fuzz build -O >/dev/null 2>>build.log || build_failed
fi
rm -f build.log
t1=$(date +%s)
bin=target/x86_64-unknown-linux-gnu/release

# The targets' scratch disk images go here, not into the shared /tmp.
work=$(mktemp -d -t ember-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
export TMPDIR=$work

# Seeds: the test guests are real ELF kernels (one with a PVH note) for the loader.
if make -s -C "$root/tests/guests" OUT="$work/guests" >/dev/null 2>&1; then
    mkdir -p corpus/kernel_loader
    cp "$work"/guests/*.elf corpus/kernel_loader/ 2>/dev/null || true
fi

mkdir -p artifacts
failed=0
failed_targets=0
printf '\n%-20s %12s %8s %s\n' target executions crashes notes
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    notes=""
    crashes=0
    # Regressions first: each input once; any failure is a crash that came back.
    if compgen -G "regressions/$t/*" >/dev/null; then
        n=$(find "regressions/$t" -type f | wc -l)
        if ! "$bin/$t" -runs=1 regressions/"$t"/* >"$work/$t.replay" 2>&1; then
            crashes=$((crashes + 1))
            notes="regression input crashed again (see $work/$t.replay)"
            tail -30 "$work/$t.replay" >&2
        else
            notes="$n regression inputs ok"
        fi
    fi
    "$bin/$t" "corpus/$t" -max_total_time="$secs" -print_final_stats=1 -timeout=10 \
        -rss_limit_mb=4096 -artifact_prefix="artifacts/$t-" >"$work/$t.log" 2>&1 || true
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -1)
    if grep -qE '^SUMMARY: |Test unit written to' "$work/$t.log"; then
        crashes=$((crashes + 1))
        art=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$work/$t.log" | tail -1)
        notes="$notes; CRASH: fuzz/$art"
        grep -E 'panicked at|^SUMMARY|ERROR: ' "$work/$t.log" | head -5 >&2
    fi
    if [ "$crashes" -ne 0 ]; then
        failed=1
        failed_targets=$((failed_targets + 1))
    fi
    printf '%-20s %12s %8s %s\n' "$t" "${execs:-?}" "$crashes" "$notes"
done
t2=$(date +%s)
echo "fuzz: build $((t1 - t0)) s, fuzzing $((t2 - t1)) s (${secs} s per target)"
echo "fuzz: reproduce with: scripts/fuzz.sh $secs ${targets[*]}"
echo "fuzz: $((${#targets[@]} - failed_targets)) passed, $failed_targets failed"
if [ "$failed" -ne 0 ]; then
    echo "fuzz: FAILED: a target crashed" >&2
    exit 1
fi
