#!/usr/bin/env bash
# Ember's main job on a fresh machine (the README's first set-up command):
#   1. install what is missing and build Ember, the test guests and the guest kit;
#   2. boot a guest: on hardware KVM the kit's Debian kernel to its shell prompt's ready line,
#      on a kvm_pvm host (software KVM) a test guest, then the kit's kernel up to its banner;
#   3. VM start-up against container start-up on the same root filesystem (`ember bench`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
cargo build --release
make -s -C tests/guests
scripts/kit.sh
# The minimal microVM kernel `ember bench` boots (first time about 10-19 min on 2 cores; cached).
scripts/microvm-kernel.sh
ember=target/x86_64-unknown-linux-gnu/release/ember
kit=${EMBER_KIT:-$HOME/.cache/ember/kit}

pvm=no
[ -d /sys/module/kvm_pvm ] && pvm=yes

echo
echo "== a test guest (freestanding, prints a line and resets the machine)"
"$ember" run --kernel tests/guests/build/hello.elf --timings

if [ "$pvm" = yes ]; then
  echo
  echo "== Debian's kernel, up to its banner (this host's /dev/kvm is kvm_pvm: software"
  echo "   virtualization, guest code ~1000x slower; Linux never reaches userspace here, so the"
  echo "   demo stops at the banner; on hardware KVM it boots to the initramfs shell)"
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
