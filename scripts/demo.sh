#!/usr/bin/env bash
# Ember's main job on a fresh machine (the README's first set-up command):
#   1. install what is missing and build Ember, the test guests and the guest kit;
#   2. boot guests: a test guest; Ember's microVM kernel to its initramfs's ready line (on every
#      host, ~30 s on a kvm_pvm one); the kit's Debian kernel to its ready line on hardware KVM,
#      to its banner on kvm_pvm (where the unmodified kernel stops at XRSTOR);
#   3. VM start-up against container start-up on the same root filesystem (`ember bench`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo build --release
make -s -C tests/guests
scripts/kit.sh
# Ember's microVM kernel (first time about 3 min on 2 idle cores, plus apt; cached).
scripts/microvm-kernel.sh
ember=target/x86_64-unknown-linux-gnu/release/ember
kit=${EMBER_KIT:-$HOME/.cache/ember/kit}

pvm=no
[ -d /sys/module/kvm_pvm ] && pvm=yes

echo
echo "== a test guest (freestanding, prints a line and resets the machine)"
"$ember" run --kernel tests/guests/build/hello.elf --timings

microvm=${EMBER_MICROVM_KERNEL:-$HOME/.cache/ember/microvm-kernel}
echo
echo "== Ember's microVM kernel with the kit's initramfs: ready line, then poweroff"
if [ "$pvm" = yes ]; then
  echo "   (this host's /dev/kvm is kvm_pvm: guest kernel code is emulated, so this takes ~17 s;"
  echo "   Ember adds the kernel words the host needs, EMBER_LOG=info lists them)"
fi
"$ember" run --kernel "$microvm/vmlinux" --initramfs "$kit/initramfs-poweroff.cpio" \
  --disk "path=$kit/rootfs.ext4,readonly=on" --timings --ready-marker "ember-kit: ready" </dev/null

if [ "$pvm" = yes ]; then
  echo
  echo "== Debian's kernel, up to its banner (on kvm_pvm its unmodified kernel stops at XRSTOR"
  echo "   before userspace; on hardware KVM the demo boots it to the initramfs shell)"
  timeout 120 "$ember" run --kernel "$kit/vmlinux" --initramfs "$kit/initramfs-reboot.cpio" \
    --cmdline "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 pci=off" \
    </dev/null | grep -m1 -E "Linux version" || true
else
  echo
  echo "== Debian's kernel with a busybox initramfs: boots, prints its ready line, reboots"
  "$ember" run --kernel "$kit/vmlinux" --initramfs "$kit/initramfs-reboot.cpio" \
    --disk "path=$kit/rootfs.ext4" --timings --ready-marker "ember-kit: ready" </dev/null
fi

echo
echo "== start-up: microVM against containers on the same root filesystem"
"$ember" bench
