#!/bin/sh
# Early boot: filesystems, the drivers of Carrel's devices, hostname. Kept short: the
# agent and the desktop start when it returns.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -o remount,rw / 2>/dev/null
hostname -F /etc/hostname
# vsock first: the agent needs it. The rest bind the screen, keyboard, tablet and rng.
modprobe -a vmw_vsock_virtio_transport virtio_gpu virtio_input evdev virtio_rng
echo "carrel: modules loaded; virtio devices: $(ls /sys/bus/virtio/devices | tr '\n' ' ')" >/dev/console
