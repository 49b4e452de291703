#!/bin/busybox sh
# /init.sh of the Ember guest kit's initramfs: what comes after /init (scripts/kit/ember-init.c),
# which has mounted proc, sysfs and devtmpfs, loaded the modules, printed the ready lines and
# runs this as `busybox sh /init.sh ACTION TOKEN` for the actions below (do not run it on a host).
#
#   shell      mounts /dev/vda at /mnt if there is one (`ember-kit: mounted vda`, read-only when
#              the disk is) and gives a shell on the console.
#   disktest   (tests/integration/kernels.rs) mounts /dev/vda (the kit's rootfs.ext4, or a copy)
#              read-write at /mnt, then prints
#                ember-kit: mounted vda rw
#                ember-kit: sha ok|bad      `sha256sum -c hello.sha256` in /mnt
#                ember-kit: disk done       after writing /mnt/written.txt, sync and umount
#              and, when there is a second disk (/dev/vdb, attached readonly=on):
#                ember-kit: vdb ro N        the kernel's read-only flag for it
#                ember-kit: vdb write refused | ember-kit: vdb write succeeded
#              then the /proc/interrupts lines of the disks and the serial port (`ember-kit: irq
#              ...`), and `poweroff -f`. written.txt holds one line, `ember-kit disktest TOKEN`,
#              so the host can tell this boot wrote it. Any step that fails prints `ember-kit:
#              disktest failed: WHAT` and powers off without `disk done`.
#
# The archive holds no applet links (hundreds of symlinks cost seconds of unpacking under an
# emulated kernel); Debian's busybox shell runs applets by name without them.
ACTION=${1:-shell}
TOKEN=${2:-none}
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

# add_disk() has run once insmod returns, but devtmpfs creates the node asynchronously: make it
# ourselves if it is not there yet. Fails when there is no such disk.
disk_node() {
    [ -e "/sys/block/$1/dev" ] || return 1
    [ -b "/dev/$1" ] && return 0
    IFS=: read -r major minor <"/sys/block/$1/dev"
    # devtmpfs may make it between the test and mknod.
    mknod "/dev/$1" b "$major" "$minor" 2>/dev/null || [ -b "/dev/$1" ]
}

disktest_failed() {
    echo "ember-kit: disktest failed: $1"
    exec poweroff -f
}

disktest() {
    disk_node vda || disktest_failed "no /dev/vda"
    mount -t ext4 -o rw /dev/vda /mnt || disktest_failed "mount -t ext4 -o rw /dev/vda /mnt"
    echo "ember-kit: mounted vda rw"
    if (cd /mnt && sha256sum -c hello.sha256); then
        echo "ember-kit: sha ok"
    else
        echo "ember-kit: sha bad"
    fi
    echo "ember-kit disktest $TOKEN" >/mnt/written.txt || disktest_failed "writing /mnt/written.txt"
    sync || disktest_failed "sync"
    umount /mnt || disktest_failed "umount /mnt"
    echo "ember-kit: disk done"
    if disk_node vdb; then
        read -r ro </sys/block/vdb/ro
        echo "ember-kit: vdb ro $ro"
        # A write straight to the device, past any filesystem: the kernel or the device must
        # refuse it.
        if echo "ember-kit wrote this" | dd of=/dev/vdb bs=512 seek=1 conv=sync,fsync 2>/dev/null; then
            echo "ember-kit: vdb write succeeded"
        else
            echo "ember-kit: vdb write refused"
        fi
    fi
    while read -r line; do
        case "$line" in
            *virtio* | *ttyS*) echo "ember-kit: irq $line" ;;
        esac
    done </proc/interrupts
    exec poweroff -f
}

case "$ACTION" in
    reboot) exec reboot -f ;;
    poweroff) exec poweroff -f ;;
    disktest) disktest ;;
esac

if disk_node vda; then
    # A read-only disk (readonly=on) refuses a read-write mount.
    if mount -t ext4 /dev/vda /mnt 2>/dev/null || mount -t ext4 -o ro /dev/vda /mnt; then
        echo "ember-kit: mounted vda"
    else
        echo "ember-kit: mounting vda failed"
    fi
fi

exec setsid cttyhack sh
