#!/usr/bin/env bash
# Ember's test command (the README's second set-up command; CI runs it through .ci/run).
# Builds Ember and the test guests, makes sure the guest kit is built (cached outside git), then
# runs every test: unit tests, test-guest boots, real-kernel boots, the CLI error matrix.
# On a kvm_pvm host the tests that need guest userspace skip with a loud SKIPPED line; every other
# boot test must really boot, and this script fails if none did.
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$(date +%s)
scripts/deps.sh
scripts/kit.sh
# The minimal microVM kernel: built once from linux-source (about 10-19 min on 2 cores), then
# cached; tests/integration/microvm_kernel.rs boots it.
scripts/microvm-kernel.sh
t1=$(date +%s)

log=$(mktemp -t ember-test.XXXXXX)
# Every `ember run` the tests start appends its boot timeline here (see README, "Tests"): a
# non-null first_serial_byte is a guest that really ran and wrote to its console.
boots=$(mktemp -t ember-boots.XXXXXX)
export EMBER_BOOT_LOG=$boots
trap 'rm -f "$log" "$boots"' EXIT
cargo test --release --workspace --no-fail-fast -- --test-threads="${EMBER_TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
t2=$(date +%s)
# A short fuzz pass over what guests and users control (scripts/fuzz.sh; about 3 min plus build).
if [ "$status" -eq 0 ]; then scripts/fuzz.sh "${EMBER_FUZZ_SECONDS:-20}"; fi

# Parallel tests interleave their output, so count occurrences rather than whole lines; a failed
# test fails the run through $status anyway.
passed=$(grep -oE '^test (bench|bench_cli|blk|cli|console|control|exec|guests|hardening|kernels|microvm_kernel|snapshot|vsock)::[a-z0-9_]+ \.\.\. ' "$log" | wc -l)
skipped=$(grep -oE 'SKIPPED [a-z0-9_]+:' "$log" | wc -l)
reduced=$(grep -oE 'REDUCED [a-z0-9_]+:' "$log" | wc -l)
runs=$(wc -l <"$boots")
booted=$(grep -c '"first_serial_byte":[0-9]' "$boots" || true)
echo
echo "ember tests: $passed integration tests ran, $skipped of them skipped (see SKIPPED lines above)"
echo "ember tests: $reduced ran a smaller case than on hardware KVM (see REDUCED lines above)"
echo "ember tests: $runs ember runs, $booted guests booted (wrote to their console)"
echo "ember tests: deps+kit+kernel $((t1 - t0)) s, build+tests $((t2 - t1)) s"
if [ "$status" -ne 0 ]; then
  echo "ember tests: FAILED" >&2
  exit "$status"
fi
if [ -e /dev/kvm ] && [ "$booted" -eq 0 ]; then
  echo "ember tests: FAILED: /dev/kvm exists but no test booted a guest" >&2
  exit 1
fi
