#!/bin/bash
# Builds Ember's minimal microVM kernel from Debian's linux-source: `make tinyconfig` plus the
# fragment scripts/microvm-kernel/config (serial console, PVH, ACPI, initramfs, virtio-mmio +
# virtio-blk, ext4, SMP, what busybox needs, and the choices that save tens of seconds of boot on
# kvm_pvm hosts, each commented), with the patches in scripts/microvm-kernel/patches/ applied in
# name order (each one's header says what it changes, why, and on which hosts it matters). The
# same kernel boots to userspace on hardware KVM and on kvm_pvm. The benchmark (`ember bench`)
# and tests/integration/microvm_kernel.rs use it.
#
# Usage: scripts/microvm-kernel.sh [--force]
# Output: ${EMBER_MICROVM_KERNEL:-$HOME/.cache/ember/microvm-kernel} (outside git):
#   vmlinux      the ELF (PVH note), for `ember run --kernel`
#   bzImage      the same kernel, LZ4-compressed, 64-bit entry
#   config       its full .config
#   version      `make kernelrelease`
#   BUILD        source package version, config hash, build time, sizes
#   src/, build/ the unpacked source and the object tree (kept: a config change rebuilds
#                incrementally)
# Skipped when vmlinux and bzImage were built from the same source version, fragment and script;
# --force rebuilds. Environment: JOBS (make -j, default 2). Installs its build packages with apt
# (linux-source, flex, bison, bc, libelf-dev, lz4, make, gcc, patch) when they are missing.
#
# Measured on the 2-core Debian 12 development VM (shared with other builds, nice -n 10, -j2):
# see BUILD in the output directory and docs/bench.md.
set -euo pipefail

OUT=${EMBER_MICROVM_KERNEL:-$HOME/.cache/ember/microvm-kernel}
HERE=$(cd "$(dirname "$0")" && pwd)
FRAGMENT=$HERE/microvm-kernel/config
PATCHES=$HERE/microvm-kernel/patches
JOBS=${JOBS:-2}
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "microvm-kernel: unknown argument: $arg (usage: scripts/microvm-kernel.sh [--force])" >&2
            exit 2
            ;;
    esac
done

die() {
    echo "microvm-kernel: error: $*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

# --- build packages ---------------------------------------------------------------------------
PACKAGES="linux-source flex bison bc libelf-dev lz4 make gcc xz-utils patch"
missing=""
for p in $PACKAGES; do
    case "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)" in
        ii*) ;;
        *) missing="$missing $p" ;;
    esac
done
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] && SUDO= || SUDO=sudo
    echo "microvm-kernel: installing:$missing"
    $SUDO apt-get -o DPkg::Lock::Timeout=300 -qq update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 -qq install -y \
        --no-install-recommends $missing >/dev/null
fi

# linux-source depends on the versioned linux-source-X.Y, which ships /usr/src/linux-source-X.Y.tar.xz.
TARBALL=$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n1)
[ -n "$TARBALL" ] || die "no /usr/src/linux-source-*.tar.xz after installing linux-source"
SRC_PKG=$(dpkg-query -S "$TARBALL" | cut -d: -f1)
SRC_VERSION="$SRC_PKG $(dpkg-query -W -f='${Version}' "$SRC_PKG")"
KEY=$(
    {
        echo "$SRC_VERSION"
        cat "$FRAGMENT" "$0" "$PATCHES"/*.patch
    } | sha256sum | cut -d' ' -f1
)

mkdir -p "$OUT"
if [ "$FORCE" = 0 ] && [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$KEY" ] &&
    [ -f "$OUT/vmlinux" ] && [ -f "$OUT/bzImage" ]; then
    echo "microvm-kernel: up to date: $OUT ($(cat "$OUT/version"))"
    exit 0
fi
rm -f "$OUT/.stamp"
T0=$(now)

# --- source -----------------------------------------------------------------------------------
# The source tree is the tarball with our patches applied; a new source version or patch set
# unpacks it again (the object tree in build/ is kept: make rebuilds what changed).
SRC=$OUT/src
SRC_KEY="$SRC_VERSION patches $(cat "$PATCHES"/*.patch | sha256sum | cut -d' ' -f1)"
if [ ! -f "$SRC/.unpacked" ] || [ "$(cat "$SRC/.unpacked")" != "$SRC_KEY" ]; then
    echo "microvm-kernel: unpacking $TARBALL"
    rm -rf "$SRC"
    mkdir -p "$SRC"
    tar -xJf "$TARBALL" -C "$SRC" --strip-components=1
    for p in "$PATCHES"/*.patch; do
        echo "microvm-kernel: applying $(basename "$p")"
        patch -s -p1 -d "$SRC" <"$p" || die "$(basename "$p") does not apply to $SRC_VERSION"
    done
    echo "$SRC_KEY" >"$SRC/.unpacked"
fi
T_SRC=$(since "$T0")

# --- config -----------------------------------------------------------------------------------
B=$OUT/build
mkdir -p "$B"
make -s -C "$SRC" O="$B" tinyconfig >/dev/null
# -m: merge only; olddefconfig then resolves dependencies once, with every line in place.
(cd "$B" && "$SRC/scripts/kconfig/merge_config.sh" -m -O "$B" "$B/.config" "$FRAGMENT" >/dev/null)
make -s -C "$SRC" O="$B" olddefconfig >/dev/null
# Kconfig silently drops a symbol whose dependencies are not met: check every line we asked for.
bad=""
while read -r line; do
    case "$line" in
        CONFIG_*=*)
            grep -qx "$line" "$B/.config" || bad="$bad ${line%%=*}"
            ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }
            sym=${sym%% *}
            ! grep -q "^$sym=" "$B/.config" || bad="$bad $sym(not unset)"
            ;;
    esac
done <"$FRAGMENT"
[ -z "$bad" ] || die "Kconfig did not keep:$bad (see $B/.config)"

# --- build ------------------------------------------------------------------------------------
T1=$(now)
echo "microvm-kernel: building vmlinux bzImage (make -j$JOBS; log: $OUT/build.log)"
if ! make -C "$SRC" O="$B" -j"$JOBS" vmlinux bzImage >"$OUT/build.log" 2>&1; then
    tail -n 20 "$OUT/build.log" >&2
    die "make failed (full log: $OUT/build.log)"
fi
T_BUILD=$(since "$T1")

cp "$B/vmlinux" "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
cp "$B/arch/x86/boot/bzImage" "$OUT/bzImage.tmp" && mv "$OUT/bzImage.tmp" "$OUT/bzImage"
cp "$B/.config" "$OUT/config"
make -s -C "$SRC" O="$B" kernelrelease >"$OUT/version"
size() { stat -c %s "$1"; }
{
    echo "source $SRC_VERSION"
    echo "release $(cat "$OUT/version")"
    echo "fragment-sha256 $(sha256sum "$FRAGMENT" | cut -d' ' -f1)"
    echo "patches $(cd "$PATCHES" && echo *.patch)"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) CPUs, make -j$JOBS"
    echo "unpack+config $T_SRC, make $T_BUILD, total $(since "$T0")"
    echo "vmlinux $(size "$OUT/vmlinux") bytes"
    echo "bzImage $(size "$OUT/bzImage") bytes"
} >"$OUT/BUILD"
echo "$KEY" >"$OUT/.stamp"
sed 's/^/microvm-kernel: /' "$OUT/BUILD"
