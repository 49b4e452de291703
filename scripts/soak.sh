#!/usr/bin/env bash
# Soak test: boots the virtio-blk test guest (serial output, a disk read with checksum, a write,
# a flush and a read-back, then an i8042 reset) many times in a row and many at once, and checks
# that every boot reached its last line (`blk: done`) and exited 0, and that nothing is left
# behind: no Ember process, no open file descriptor on the soak's files, no lock in /proc/locks,
# no temporary file (Ember runs with TMPDIR pointing at an empty directory, which must stay empty;
# /dev/shm is compared before and after).
#
#   scripts/soak.sh            1000 sequential boots, then 5 rounds of 20 concurrent boots
#   scripts/soak.sh --quick    50 sequential, then 1 round of 10 concurrent
#   SOAK_SEQ=N SOAK_PAR=N SOAK_ROUNDS=N scripts/soak.sh    any other mix
#
# Prints the failure count and the wall-clock time distribution (min/median/p90/max) of each
# phase. Not part of CI's test run (too long); the quick variant takes well under a minute here.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seq_n=${SOAK_SEQ:-1000}
par_n=${SOAK_PAR:-20}
rounds=${SOAK_ROUNDS:-5}
if [ "${1:-}" = "--quick" ]; then
    seq_n=${SOAK_SEQ:-50}
    par_n=${SOAK_PAR:-10}
    rounds=${SOAK_ROUNDS:-1}
fi

cargo build --release -p ember-vmm --quiet
ember=$root/target/x86_64-unknown-linux-gnu/release/ember
work=$(mktemp -d -t ember-soak.XXXXXX)
# Every Ember this run starts is recorded in $work/pids; an interrupted run kills those only.
ours() {
    local pid
    for pid in $(cat "$work/pids" 2>/dev/null); do
        # A recorded pid counts while it is still an Ember on this run's guest (pids get reused).
        if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q "^$ember run --kernel $work/"; then
            echo "$pid"
        fi
    done
}
cleanup() {
    local pid
    for pid in $(ours); do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
make -s -C tests/guests OUT="$work/guests" >/dev/null
guest=$work/guests/blk.elf
mkdir -p "$work/tmp" "$work/logs" "$work/disks"
for i in $(seq 0 $((par_n - 1))); do
    head -c $((128 * 512)) /dev/urandom >"$work/disks/d$i.img"
done
fds_before=$(ls /proc/$$/fd | wc -l)
shm_before=$(ls /dev/shm 2>/dev/null | sort)

# One boot: disk $1, log name $2. Prints the elapsed milliseconds, or FAIL.
boot() {
    local disk=$1 log=$2 t0 t1 rc=0
    t0=$(date +%s%N)
    TMPDIR=$work/tmp "$ember" run --kernel "$guest" --serial stdio \
        --cmdline "console=ttyS0 blk.mode=rw" --disk "path=$disk" \
        </dev/null >"$log.out" 2>"$log.err" &
    local pid=$!
    echo "$pid" >>"$work/pids"
    wait "$pid" || rc=$?
    t1=$(date +%s%N)
    if [ "$rc" -eq 0 ] && grep -q '^blk: readback ok' "$log.out" &&
        grep -q '^blk: done' "$log.out" && ! grep -q 'panicked' "$log.err"; then
        echo $(((t1 - t0) / 1000000))
        rm -f "$log.out" "$log.err"
    else
        echo "FAIL rc=$rc $log"
    fi
}

# min / median / p90 / max of the numbers on stdin.
stats() {
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "no successful boots"; exit }
        p = int(NR * 0.9 + 0.5); if (p < 1) p = 1; if (p > NR) p = NR
        printf "min %d ms, median %d ms, p90 %d ms, max %d ms (n=%d)\n", v[1], v[int((NR + 1) / 2)], v[p], v[NR], NR
    }'
}

report() {
    local name=$1 file=$2
    local fails
    fails=$(grep -c '^FAIL' "$file" || true)
    echo "soak: $name: $(grep -vc '^FAIL' "$file" || true) ok, $fails failed"
    echo "soak: $name: $(grep -v '^FAIL' "$file" | stats)"
    if [ "$fails" -gt 0 ]; then
        grep '^FAIL' "$file" | head -3 | while read -r _ _ log; do
            echo "--- $log" >&2
            tail -5 "$log.out" "$log.err" >&2
        done
    fi
    return 0
}

start=$(date +%s)
echo "soak: $seq_n sequential boots of the blk guest, then $rounds round(s) of $par_n at once"
: >"$work/seq.txt"
for i in $(seq 1 "$seq_n"); do
    boot "$work/disks/d0.img" "$work/logs/seq$i" >>"$work/seq.txt"
    if [ $((i % 100)) -eq 0 ]; then echo "soak: $i sequential boots done"; fi
done
report sequential "$work/seq.txt"

: >"$work/par.txt"
for r in $(seq 1 "$rounds"); do
    for i in $(seq 0 $((par_n - 1))); do
        boot "$work/disks/d$i.img" "$work/logs/par$r-$i" >"$work/par$r-$i.txt" &
    done
    wait
    cat "$work"/par"$r"-*.txt >>"$work/par.txt"
done
report "concurrent ($par_n at once)" "$work/par.txt"

# Leftovers.
leaks=0
left=$(ours)
if [ -n "$left" ]; then
    echo "soak: LEAK: Ember processes still running: $left" >&2
    leaks=$((leaks + 1))
fi
open=$(find /proc/[0-9]*/fd -lname "$work/*" 2>/dev/null | grep -v "^/proc/$$/" || true)
if [ -n "$open" ]; then
    echo "soak: LEAK: descriptors still open on the soak's files:" >&2
    echo "$open" >&2
    leaks=$((leaks + 1))
fi
fds_after=$(ls /proc/$$/fd | wc -l)
if [ "$fds_after" -ne "$fds_before" ]; then
    echo "soak: LEAK: this shell had $fds_before descriptors, now $fds_after" >&2
    leaks=$((leaks + 1))
fi
for d in "$work"/disks/*.img; do
    ino=$(stat -c %i "$d")
    if grep -qE "[0-9a-f]+:[0-9a-f]+:$ino " /proc/locks; then
        echo "soak: LEAK: $d is still locked: $(grep -E ":$ino " /proc/locks)" >&2
        leaks=$((leaks + 1))
    fi
done
if [ -n "$(ls -A "$work/tmp")" ]; then
    echo "soak: LEAK: temporary files: $(ls -A "$work/tmp")" >&2
    leaks=$((leaks + 1))
fi
new_shm=$(comm -13 <(echo "$shm_before") <(ls /dev/shm 2>/dev/null | sort) | grep -i ember || true)
if [ -n "$new_shm" ]; then
    echo "soak: LEAK: new files in /dev/shm: $new_shm" >&2
    leaks=$((leaks + 1))
fi

fails=$(cat "$work/seq.txt" "$work/par.txt" | grep -c '^FAIL' || true)
total=$(cat "$work/seq.txt" "$work/par.txt" | wc -l)
echo "soak: $total boots, $fails failed, $leaks kinds of leftovers, $(($(date +%s) - start)) s"
echo "soak: reproduce with: SOAK_SEQ=$seq_n SOAK_PAR=$par_n SOAK_ROUNDS=$rounds scripts/soak.sh"
[ "$fails" -eq 0 ] && [ "$leaks" -eq 0 ]
