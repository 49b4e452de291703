#!/bin/sh
# Reproduces docs/bench.md: builds what `ember bench` needs, then runs it.
#
# Usage: scripts/bench.sh [ember bench options...]
# Default output: the figures on stdout, docs/bench.svg (chart) and target/bench.json (every
# sample). Any option is passed to `ember bench` (e.g. --rounds 50, --guest null,
# --systems runc,crun); see `target/x86_64-unknown-linux-gnu/release/ember bench --help`.
#
# Needs scripts/deps.sh's packages (crun, runc, podman, qemu-system-x86 are peers; a missing one
# is reported, not fatal), the guest kit (scripts/kit.sh) and the test guests (the restore mode
# snapshots tests/guests/counter.c; a `firecracker` on PATH is measured there too). The minimal
# microVM kernel (scripts/microvm-kernel.sh, ~20 min to build on 2 cores) is used when built;
# without it the linux and banner modes boot the kit's Debian kernel.
set -eu
cd "$(dirname "$0")/.."

scripts/deps.sh
scripts/kit.sh >/dev/null
make -s -C tests/guests
kernel=${EMBER_MICROVM_KERNEL:-$HOME/.cache/ember/microvm-kernel}/vmlinux
if [ ! -f "$kernel" ]; then
    echo "bench: $kernel not built (scripts/microvm-kernel.sh); using the kit's vmlinux" >&2
fi
cargo build --release -q -p ember-vmm -p ember-bench
exec target/x86_64-unknown-linux-gnu/release/ember bench --json target/bench.json --chart docs/bench.svg "$@"
