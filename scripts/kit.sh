#!/bin/bash
# Builds Ember's default guest kit: a real distribution kernel and a tiny busybox userspace, for the
# real-kernel tests (tests/integration/kernels.rs) and the benchmarks.
#
# Usage: scripts/kit.sh [--force]
# Output: ${EMBER_KIT:-$HOME/.cache/ember/kit} (outside git). Each part is skipped when it is
# already built from the same inputs; --force rebuilds everything. Needs scripts/deps.sh's
# packages (apt-get, dpkg-deb, lz4, busybox-static, cpio, e2fsprogs, file) and apt package lists.
#
#   bzImage                   Debian 12's cloud kernel (the package behind linux-image-cloud-amd64)
#   vmlinux                   the ELF inside it (LZ4 payload); has a PVH note (CONFIG_PVH=y)
#   config, version           its build config and `uname -r`
#   modules/                  virtio_ring, virtio, virtio_mmio, virtio_blk .ko (Debian builds them
#                             as modules) and `order`, the load order (dependencies first)
#   rootfs/                   busybox-static root: /bin/busybox, applet symlinks, /etc, empty
#                             mount points (benchmarks pack it into OCI bundles)
#   initramfs.cpio            rootfs without its applet links + /init (scripts/kit/ember-init.c,
#                             static, no libc) + /init.sh (scripts/kit/init.sh) +
#                             modules, uncompressed newc:
#                             prints `ember-kit: cpus N`, `ember-kit: memtotal KB`,
#                             `ember-kit: ready`, mounts /dev/vda at /mnt, shell on the console;
#                             boots Debian's kernel and Ember's microVM kernel alike
#   initramfs-reboot.cpio     the same without busybox and init.sh (~200 KB): /init reboots right
#                             after the ready line
#   initramfs-poweroff.cpio   the same, /init powers off right after the ready line
#   rootfs.ext4               32 MiB ext4 (mkfs.ext4 -d, no loop mount): hello.txt, hello.sha256
#   MANIFEST                  kernel package and version, every file with size and sha256
#
# Measured on the 2-core Debian 12 development VM (2026-11): a full build takes 6-9 s (kernel
# download at ~35 MB/s and extraction 3-5 s, rootfs and the three initramfs ~1 s, MANIFEST
# sha256s ~1.5 s); with everything up to date a run takes ~1.3 s (mostly apt-cache). The kit is
# ~78 MB: vmlinux 53 MB, bzImage 14 MB, rootfs.ext4 32 MB (sparse), each initramfs 2.2 MB.
set -euo pipefail

KIT=${EMBER_KIT:-$HOME/.cache/ember/kit}
HERE=$(cd "$(dirname "$0")" && pwd)
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "kit: unknown argument: $arg (usage: scripts/kit.sh [--force])" >&2
            exit 2
            ;;
    esac
done

# The virtio drivers a distribution kernel needs for a virtio-mmio disk; their dependencies are
# added from the modules' own `depends=` (the package ships no modules.dep: depmod makes it).
MODULES="virtio_mmio virtio_blk"
BUSYBOX=/bin/busybox
# Fixed timestamps and ids so the same inputs give the same bytes (and MANIFEST sha256s).
EPOCH=1700000000
EXT4_UUID=6d2a4c1e-0b7e-4d1c-9a51-6b3e6d0e6b01
HELLO="hello from the ember guest kit"

mkdir -p "$KIT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }
die() {
    echo "kit: error: $*" >&2
    exit 1
}
for tool in apt-get apt-cache dpkg-deb lz4 cpio mkfs.ext4 file sha256sum objcopy gcc strip; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/deps.sh"
done
[ -x "$BUSYBOX" ] || die "$BUSYBOX is missing: run scripts/deps.sh (busybox-static)"
file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not static (install busybox-static)"

# A part is up to date when its stamp file holds the hash of everything it was built from.
stamp_ok() { [ "$FORCE" = 0 ] && [ -f "$KIT/.stamp-$1" ] && [ "$(cat "$KIT/.stamp-$1")" = "$2" ]; }
stamp_set() { echo "$2" >"$KIT/.stamp-$1"; }
REBUILT=0
TOTAL_START=$(now)

# --- kernel ---------------------------------------------------------------------------------
# Resolve the versioned package (e.g. linux-image-6.1.0-56-cloud-amd64) and its version from apt's
# lists; the kit is rebuilt when apt's candidate changes.
resolve_kernel() {
    apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\) (= \([^)]*\)).*/\1 \2/p' | head -n1
}
KERNEL_KEY=$(resolve_kernel || true)
if [ -z "$KERNEL_KEY" ]; then
    echo "kit: apt knows no linux-image-cloud-amd64: running apt-get update"
    apt-get -o DPkg::Lock::Timeout=300 -qq update
    KERNEL_KEY=$(resolve_kernel || true)
fi
[ -n "$KERNEL_KEY" ] || die "cannot resolve linux-image-cloud-amd64 to a kernel package"
read -r PKG PKG_VERSION <<<"$KERNEL_KEY"

# Writes $1/vmlinux from the bzImage $2. Like Linux's scripts/extract-vmlinux, find the
# compressed payload by its magic (LZ4 legacy frame: 02 21 4c 18); unlike it, check the hit
# against the boot header's payload_offset and decompress exactly payload_length - 4 bytes (the
# last 4 are the uncompressed size), so lz4's exit status means something.
bytes() { dd if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3" bs=1M status=none; }
extract_vmlinux() {
    local out=$1 img=$2 magic_at setup_sects payload_offset payload_length start expect
    magic_at=$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$img" | head -n1 | cut -d: -f1)
    [ -n "$magic_at" ] || die "$img has no LZ4 payload (kernel not built with CONFIG_KERNEL_LZ4?)"
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$img" | tr -d ' ')
    payload_offset=$(od -An -tu4 -j $((0x248)) -N4 "$img" | tr -d ' ')
    payload_length=$(od -An -tu4 -j $((0x24c)) -N4 "$img" | tr -d ' ')
    start=$(((setup_sects + 1) * 512 + payload_offset))
    [ "$start" = "$magic_at" ] ||
        die "LZ4 magic at $magic_at but the boot header puts the payload at $start"
    bytes "$img" "$start" $((payload_length - 4)) | lz4 -dc >"$out/vmlinux" ||
        die "lz4 could not decompress the payload of $img"
    expect=$(bytes "$img" $((start + payload_length - 4)) 4 | od -An -tu4 | tr -d ' ')
    [ "$(stat -c %s "$out/vmlinux")" = "$expect" ] ||
        die "vmlinux is $(stat -c %s "$out/vmlinux") bytes, the payload says $expect"
    file "$out/vmlinux" | grep -q 'ELF 64-bit LSB executable, x86-64' ||
        die "the payload of $img is not an x86-64 ELF: $(file -b "$out/vmlinux")"
}

# Prints the module names needed for $* (dependencies first, each once), read from each .ko's
# .modinfo `depends=` in the extracted tree $MODDIR.
declare -A SEEN=()
module_path() { find "$MODDIR" -name "$1.ko" -o -name "${1//_/-}.ko" | head -n1; }
module_order() {
    local m ko deps d
    for m in "$@"; do
        [ -n "${SEEN[$m]:-}" ] && continue
        SEEN[$m]=1
        ko=$(module_path "$m")
        [ -n "$ko" ] || die "module $m is not in $PKG (compressed or built in?)"
        deps=$(objcopy -O binary --only-section=.modinfo "$ko" /dev/stdout | tr '\0' '\n' |
            sed -n 's/^depends=//p' | tr ',' ' ')
        for d in $deps; do module_order "$d"; done
        echo "$m"
    done
}

build_kernel() {
    local x="$TMP/kernel" vmlinuz m
    mkdir -p "$x"
    # apt's sandbox user cannot write to our private temp dir; downloading as root is fine here.
    (cd "$TMP" && apt-get -qq -o APT::Sandbox::User=root download "$PKG=$PKG_VERSION") ||
        die "apt-get download $PKG failed"
    dpkg-deb -x "$TMP"/"$PKG"_*.deb "$x"
    vmlinuz=$(ls "$x"/boot/vmlinuz-*)
    rm -rf "$KIT/modules" && mkdir -p "$KIT/modules"
    cp "$vmlinuz" "$KIT/bzImage"
    cp "$x"/boot/config-* "$KIT/config"
    basename "$vmlinuz" | sed 's/^vmlinuz-//' >"$KIT/version"
    extract_vmlinux "$KIT" "$KIT/bzImage"
    grep -q '^CONFIG_PVH=y' "$KIT/config" || echo "kit: warning: kernel has no CONFIG_PVH"
    MODDIR="$x/lib/modules"
    module_order $MODULES >"$KIT/modules/order"
    while read -r m; do
        cp "$(module_path "$m")" "$KIT/modules/$m.ko"
    done <"$KIT/modules/order"
}

part() {
    local name=$1 key=$2 fn=$3 t
    t=$(now)
    if stamp_ok "$name" "$key"; then
        echo "kit: $name: up to date"
        return
    fi
    rm -f "$KIT/.stamp-$name"
    "$fn"
    stamp_set "$name" "$key"
    REBUILT=1
    echo "kit: $name: built in $(since "$t")"
}

part kernel "$KERNEL_KEY" build_kernel
echo "kit: kernel: $PKG $PKG_VERSION ($(cat "$KIT/version"))"

# --- rootfs and initramfs -------------------------------------------------------------------
fix_times() { find "$1" -exec touch -h -d "@$EPOCH" {} +; }

build_rootfs() {
    local r="$TMP/rootfs" applet
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,root,etc,lib/modules}
    chmod 1777 "$r/tmp"
    cp "$BUSYBOX" "$r/bin/busybox"
    for applet in $("$BUSYBOX" --list-full); do
        [ -e "$r/$applet" ] || ln -s /bin/busybox "$r/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
    printf 'root:x:0:\n' >"$r/etc/group"
    fix_times "$r"
    rm -rf "$KIT/rootfs" && mv "$r" "$KIT/rootfs"
}

# $1 = action (shell, reboot, poweroff), $2 = output file.
make_initramfs() {
    local stage="$TMP/initramfs-$1" m
    cp -a "$KIT/rootfs" "$stage"
    # No applet links: the guest kernel makes each one while unpacking, which took ~10 s of the
    # boot on kvm_pvm; busybox's shell (FEATURE_SH_STANDALONE) runs applets by name without them.
    find "$stage" -type l -delete
    # /init: a tiny static program (no libc) that gets to the ready line without a fork; the
    # action is built in, the command line's ember.kit= overrides it.
    sed "s/@ACTION@/$1/" "$HERE/kit/ember-init.c" >"$TMP/ember-init-$1.c"
    gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie \
        -fno-asynchronous-unwind-tables -Wl,--build-id=none -o "$stage/init" "$TMP/ember-init-$1.c"
    strip "$stage/init"
    cp "$HERE/kit/init.sh" "$stage/init.sh"
    chmod 755 "$stage/init" "$stage/init.sh"
    # reboot and poweroff need nothing after /init: without busybox (2 MB) the kernel has a tenth
    # as much to unpack (~5 s less on kvm_pvm).
    case "$1" in reboot | poweroff) rm "$stage/bin/busybox" "$stage/init.sh" ;; esac
    cp "$KIT/modules/order" "$stage/lib/modules/order"
    while read -r m; do cp "$KIT/modules/$m.ko" "$stage/lib/modules/"; done <"$KIT/modules/order"
    # The kernel opens /dev/console before /init runs; only root can make the node (init copes
    # without it).
    if [ "$(id -u)" = 0 ]; then mknod -m 600 "$stage/dev/console" c 5 1; fi
    fix_times "$stage"
    # Uncompressed: guests unpack it slowly enough already (gzip is far worse under kvm_pvm).
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible) >"$KIT/$2.tmp"
    mv "$KIT/$2.tmp" "$KIT/$2"
}

build_initramfs() {
    build_rootfs
    make_initramfs shell initramfs.cpio
    make_initramfs reboot initramfs-reboot.cpio
    make_initramfs poweroff initramfs-poweroff.cpio
}

USERSPACE_KEY=$(cat "$BUSYBOX" "$HERE/kit/ember-init.c" "$HERE/kit/init.sh" "$0" "$KIT/modules/order" "$KIT"/modules/*.ko |
    sha256sum | cut -d' ' -f1)
part initramfs "$USERSPACE_KEY" build_initramfs

# --- rootfs.ext4 ----------------------------------------------------------------------------
build_ext4() {
    local d="$TMP/ext4"
    mkdir -p "$d"
    echo "$HELLO" >"$d/hello.txt"
    (cd "$d" && sha256sum hello.txt >hello.sha256)
    fix_times "$d"
    rm -f "$KIT/rootfs.ext4"
    # Created beforehand so mkfs does not announce it is creating a regular file.
    truncate -s 32M "$KIT/rootfs.ext4.tmp"
    # Fixed UUID and hash seed: tests can recognise the disk (inode ctimes still vary).
    E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -F -d "$d" -L ember-kit -U "$EXT4_UUID" \
        -E root_owner=0:0,hash_seed="$EXT4_UUID" -t ext4 "$KIT/rootfs.ext4.tmp"
    mv "$KIT/rootfs.ext4.tmp" "$KIT/rootfs.ext4"
}
part rootfs.ext4 "$(echo "$HELLO" | cat - "$0" | sha256sum | cut -d' ' -f1)" build_ext4

# --- MANIFEST -------------------------------------------------------------------------------
write_manifest() {
    local f
    {
        echo "# Ember guest kit (scripts/kit.sh): sha256 size path; symlinks as path -> target"
        echo "kernel-package $PKG $PKG_VERSION"
        echo "kernel-version $(cat "$KIT/version")"
        echo "modules $(tr '\n' ' ' <"$KIT/modules/order" | sed 's/ $//')"
        echo "hello.txt $(printf '%s\n' "$HELLO" | sha256sum | cut -d' ' -f1)"
        cd "$KIT"
        for f in bzImage vmlinux config version initramfs.cpio initramfs-reboot.cpio \
            initramfs-poweroff.cpio rootfs.ext4 $(find modules rootfs -type f | LC_ALL=C sort); do
            echo "$(sha256sum "$f" | cut -d' ' -f1) $(stat -c %s "$f") $f"
        done
        find rootfs -type l | LC_ALL=C sort | while read -r f; do
            echo "$f -> $(readlink "$f")"
        done
    } >"$KIT/MANIFEST.tmp"
    mv "$KIT/MANIFEST.tmp" "$KIT/MANIFEST"
}
if [ "$REBUILT" = 1 ] || [ ! -f "$KIT/MANIFEST" ]; then
    t=$(now)
    write_manifest
    echo "kit: MANIFEST: written in $(since "$t")"
else
    echo "kit: MANIFEST: up to date"
fi

echo "kit: $KIT ready in $(since "$TOTAL_START")"
