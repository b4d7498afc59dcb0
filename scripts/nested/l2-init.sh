#!/bin/sh
# /carrel-init of the Linux guest (L2) that scripts/nested-test.sh boots in carrel-vmm (and
# QEMU, for the benchmark) inside the nested machine: the minimal initramfs of
# kernels/linux/build-initramfs.sh with, appended, the generic kernel's modules for
# virtio-mmio, vsock and rng. Booted with rdinit=/carrel-init: it says when it runs
# ("carrel-l2: init"), loads the modules in /modules.list, lists the virtio devices Linux
# bound, and hands PID 1 to the guest agent (/init).
/bin/mkdir -p /dev /proc /sys
/bin/mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
/bin/mount -t proc proc /proc
/bin/mount -t sysfs sys /sys
echo "carrel-l2: init at $(cut -d' ' -f1 /proc/uptime) s of guest time"
while read -r module; do
    [ -n "$module" ] && insmod "/lib/modules/$module"
done </modules.list
for device in /sys/bus/virtio/devices/*; do
    [ -e "$device" ] || continue
    echo "carrel-l2: virtio ${device##*/}: device $(cat "$device/device") driver $(basename "$(readlink "$device/driver" 2>/dev/null || echo none)")"
done
echo "carrel-l2: starting the guest agent at $(cut -d' ' -f1 /proc/uptime) s"
exec /init
