#!/bin/sh
# Installs what Ember's build, guest kit (scripts/kit.sh), tests and benchmarks need on a bare
# Debian 12 machine. Idempotent: asks dpkg what is missing and only then runs `apt-get update`
# (once) and `apt-get install` for the missing packages; prints nothing else when all is there.
# Rust (rustup, a stable toolchain with cargo) is assumed present; we only check for it.
#
#   gcc, binutils, make      test guests (tests/guests) and the cc crate
#   acpica-tools (iasl)      disassembling/checking Ember's ACPI tables in tests
#   busybox-static, cpio     the kit's initramfs and rootfs
#   lz4                      extracting vmlinux from Debian's LZ4-compressed bzImage
#   e2fsprogs                mkfs.ext4 -d for the kit's rootfs.ext4
#   file, xz-utils, zstd     identifying and unpacking kernel payloads / modules
#   crun, runc, podman       container peers for the benchmarks (ember bench)
#   qemu-system-x86          QEMU's microvm machine, a VMM peer for the benchmarks
set -eu

PACKAGES="build-essential gcc binutils make acpica-tools busybox-static cpio lz4 e2fsprogs
file xz-utils zstd crun runc podman qemu-system-x86 ca-certificates git"

missing=""
for p in $PACKAGES; do
    # `ii` = installed; anything else (absent, half-configured, removed) needs apt.
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    case "$status" in
        ii*) ;;
        *) missing="$missing $p" ;;
    esac
done

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        SUDO=sudo
    else
        SUDO=
    fi
    echo "deps: installing:$missing"
    # Another apt run (e.g. a parallel setup) may hold the dpkg lock: wait for it, don't fail.
    $SUDO apt-get -o DPkg::Lock::Timeout=300 -qq update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 -qq install -y \
        --no-install-recommends $missing >/dev/null
    echo "deps: done"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "deps: cargo not found: install Rust with rustup (https://rustup.rs), then rerun" >&2
    exit 1
fi
