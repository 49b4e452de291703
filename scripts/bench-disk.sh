#!/usr/bin/env bash
# Ember's disk benchmark (docs/disk-bench.md): sequential read and write of a whole disk image in
# 1 MiB requests, a flush, and 4 KiB random reads, measured three ways on the same image file:
#
#   guest   tests/guests/blk.elf with `blk.mode=bench` under `ember run --disk`: the real device
#           path end to end (guest driver, MMIO notify exit, ioeventfd, event loop, device model,
#           file I/O, copies into guest memory, used ring). The guest polls the used ring; the
#           host timestamps its `bench: PHASE start|done` console lines as they arrive, which is
#           the figure reported (the guest's own RDTSC count is printed alongside as a check).
#           A freestanding driver, not Linux: on a kvm_pvm host guest kernel code is emulated
#           (~1000x slower), and a Linux guest's block layer would measure that emulation, not the
#           device; the driver keeps guest work per request tiny.
#   device  devices/examples/blk_bench.rs: the same requests pushed into Ember's virtio-blk device
#           model in-process, no KVM: the device model's own cost.
#   host    the same workloads with pread/pwrite on the file: what the host's page cache gives.
#
# Reads find the image in the host's page cache in all three (it was just written and read):
# Ember's device does not use O_DIRECT, so a guest read is a page-cache read and the fair
# host baseline is one too. One host O_DIRECT run is printed at the end for reference (the disk
# under the page cache); it runs last because it drops the image's cached pages.
#
# Usage: scripts/bench-disk.sh [--size MIB] [--rand N] [--runs N] [--seg BYTES]
#   --size MIB   image size (default 256; at least 256 for a meaningful sequential figure)
#   --rand N     4 KiB random reads per run (default 20000)
#   --runs N     runs of each of guest / device / host; the table shows medians (default 5)
#   --seg BYTES  data segment size of the 1 MiB requests (default 8192: 128 segments)
# Takes about a minute on a loaded 2-core kvm_pvm VM; the image lives in a temp dir under
# ${TMPDIR:-/tmp} and is removed at the end.
# EMBER=PATH and BLK_BENCH=PATH use those binaries instead of building target/x86_64-unknown-linux-gnu/release/ember and
# the blk_bench example (to compare two builds of the device).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=256
RAND=20000
RUNS=5
SEG=8192
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE=$2; shift 2 ;;
        --rand) RAND=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --seg) SEG=$2; shift 2 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "bench-disk: unknown argument: $1 (see --help)" >&2
            exit 2
            ;;
    esac
done
for v in "$SIZE" "$RAND" "$RUNS" "$SEG"; do
    [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "bench-disk: not a positive number: $v" >&2; exit 2; }
done
if [ $((SEG % 512)) != 0 ] || [ "$SEG" -gt 1048576 ] || [ $((1048576 / SEG)) -gt 254 ]; then
    echo "bench-disk: --seg must be a multiple of 512 that splits 1 MiB into at most 254 segments" >&2
    exit 2
fi

if [ -d /sys/module/kvm_pvm ]; then
    HOST_KIND="kvm_pvm (software nested virtualization: guest code ~1000x slower than hardware)"
else
    HOST_KIND="hardware KVM"
fi
[ -e /dev/kvm ] || { echo "bench-disk: /dev/kvm is missing" >&2; exit 1; }

echo "bench-disk: reproduce with: scripts/bench-disk.sh --size $SIZE --rand $RAND --runs $RUNS --seg $SEG"
echo "bench-disk: host kind: $HOST_KIND"
echo "bench-disk: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), load $(cut -d' ' -f1-3 /proc/loadavg)"

if [ -z "${EMBER:-}" ]; then
    cargo build -q --release -p ember-vmm --bin ember
    EMBER=target/x86_64-unknown-linux-gnu/release/ember
fi
if [ -z "${BLK_BENCH:-}" ]; then
    cargo build -q --release -p ember-devices --example blk_bench
    BLK_BENCH=target/x86_64-unknown-linux-gnu/release/examples/blk_bench
fi
DRIVER=$BLK_BENCH

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ember-bench-disk.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
make -s -C tests/guests OUT="$TMP/guests"
IMG=$TMP/disk.img
RESULTS=$TMP/results

START=$(date +%s)
echo "bench-disk: image $IMG, $SIZE MiB on $(df --output=source,fstype "$TMP" | tail -n1 | tr -s ' ')"
head -c "${SIZE}M" /dev/urandom >"$IMG"
# On stable storage first, so the creation's writeback does not land in a measured phase; then
# read once so every reader starts from a warm page cache.
sync "$IMG"
cat "$IMG" >/dev/null
TSC_HZ=$("$DRIVER" tsc-hz | awk '{ print $3 }')

# Runs the guest once; appends `blk_bench: guest PHASE bytes B requests R seconds S` (console
# timestamps) and `... guest-tsc ...` (the guest's RDTSC ticks / the host's TSC rate) lines.
run_guest() {
    local log=$TMP/guest.log status
    set +e
    "$EMBER" run --kernel "$TMP/guests/blk.elf" --disk "path=$IMG" \
        --cmdline "console=ttyS0 blk.mode=bench blk.rand=$RAND blk.seg=$SEG" 2>"$TMP/guest.err" |
        while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "${line%$'\r'}"; done >"$log"
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" != 0 ] || ! grep -q ' blk: done$' "$log" || grep -q 'blk: error' "$log"; then
        echo "bench-disk: the guest run failed (ember exit $status):" >&2
        cat "$log" "$TMP/guest.err" >&2
        exit 1
    fi
    awk -v hz="$TSC_HZ" '
        $2 == "bench:" && $4 == "start" { start[$3] = $1 }
        $2 == "bench:" && $4 == "done" { done[$3] = $1 }
        $2 == "bench:" && $4 == "bytes" {
            printf "blk_bench: guest %s bytes %s requests %s seconds %.6f\n", $3, $5, $7, done[$3] - start[$3]
            printf "blk_bench: guest-tsc %s bytes %s requests %s seconds %.6f\n", $3, $5, $7, $9 / hz
        }' "$log"
}

# Every MiB of the image now holds what seq-write wrote: the image's last MiB as seq-read left it.
check_image() {
    local last=$((SIZE - 1)) i
    for i in 0 $((SIZE / 2)) "$last"; do
        cmp -s <(dd if="$IMG" bs=1M skip="$i" count=1 status=none) \
            <(dd if="$IMG" bs=1M skip="$last" count=1 status=none) ||
            { echo "bench-disk: MiB $i of the image is not what $1 wrote" >&2; exit 1; }
    done
}

: >"$RESULTS"
for run in $(seq "$RUNS"); do
    for who in host device guest; do
        case "$who" in
            host) "$DRIVER" host "$IMG" --rand "$RAND" >"$TMP/one" ;;
            device) "$DRIVER" device "$IMG" --rand "$RAND" --seg "$SEG" >"$TMP/one" ;;
            guest) run_guest >"$TMP/one" ;;
        esac
        check_image "$who"
        awk -v run="$run" '{ printf "bench-disk: run %s %-10s %-9s %s s\n", run, $2, $3, $9 }' "$TMP/one"
        cat "$TMP/one" >>"$RESULTS"
    done
done
"$DRIVER" host "$IMG" --rand "$RAND" --direct >"$TMP/one"
cat "$TMP/one" >>"$RESULTS"

echo
echo "Medians of $RUNS runs; MB/s = 10^6 bytes/s; ${SIZE} MiB image, 1 MiB requests (${SEG}-byte segments), one request in flight."
awk -v runs="$RUNS" '
    function median(list,    n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
        who = $2; phase = $3; bytes = $5; reqs = $7; secs = $9
        if (phase == "flush") v = secs * 1000
        else if (phase == "rand-read") v = reqs / secs
        else v = bytes / secs / 1e6
        vals[who, phase] = vals[who, phase] " " v
    }
    END {
        split("seq-read seq-write flush rand-read", phases, " ")
        label["seq-read"] = "seq read (MB/s)"; label["seq-write"] = "seq write (MB/s)"
        label["flush"] = "flush after write (ms)"; label["rand-read"] = "4K rand read (IOPS)"
        printf "%-24s %10s %10s %10s %11s %12s %11s %10s\n", "workload", "guest", "device", "host", \
            "guest/host", "device/host", "guest-tsc", "host-odir"
        for (p = 1; p <= 4; p++) {
            ph = phases[p]
            g = median(vals["guest", ph]); d = median(vals["device", ph]); h = median(vals["host", ph])
            gt = median(vals["guest-tsc", ph]); o = median(vals["host-direct", ph])
            fmt = ph == "flush" ? "%10.1f" : "%10.0f"
            printf "%-24s " fmt " " fmt " " fmt " %11.2f %12.2f " fmt " " fmt "\n", label[ph], g, d, h, \
                h ? g / h : 0, h ? d / h : 0, gt, o
        }
    }' "$RESULTS"
cat <<EOF

guest       ember run + tests/guests/blk.elf (blk.mode=bench): the whole device path, timed by the
            host from the guest's console lines
device      devices/examples/blk_bench.rs: Ember's virtio-blk model driven in-process, no VM;
            the time inside Block::process_queue only (not the driver's own ring writes)
host        pread/pwrite on the same file, warm page cache (the same for the guest and the device)
guest-tsc   the guest's own RDTSC count for the same phases, divided by the host's TSC rate
            ($TSC_HZ Hz): agreeing with 'guest' means RDTSC is usable in this guest
host-odir   one host run with O_DIRECT (the disk under the page cache), for reference only
For flush, lower is better and the ratios are times, not speeds.
EOF
echo "bench-disk: measured in $(($(date +%s) - START)) s (image, $RUNS runs, O_DIRECT run; build excluded)"
