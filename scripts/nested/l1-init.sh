#!/bin/busybox sh
# /init of the nested test machine (L1) that scripts/nested-test.sh boots in QEMU TCG with
# an emulated SVM CPU. It loads the modules listed in /modules.list (virtio-pci, 9p, rng,
# kvm_amd nested=1), mounts the host's root filesystem read-only from the 9p share
# "hostroot", puts writable tmpfs where the tests write, mounts the job directory (share
# "job", read-write) at the same path it has on the host, and runs the job's job.sh (with
# the carrel.phase= of the command line: desk, linux or all) chrooted
# into the host's filesystem: the test binaries, their absolute paths, bash and the
# libraries are the host's own. It prints the job's exit code as
# "carrel-nested: exit N" and powers the machine off.
/bin/busybox mkdir -p /proc /sys /dev /host
/bin/busybox mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
export PATH=/bin

say() { echo "carrel-nested: $*"; }
fail() {
    say "L1 setup failed: $*"
    say "exit 125"
    poweroff -f
    sleep 10
}

job=""
repo=""
phase=all
for word in $(cat /proc/cmdline); do
    case "$word" in
        carrel.job=*) job="${word#carrel.job=}" ;;
        carrel.repo=*) repo="${word#carrel.repo=}" ;;
        carrel.phase=*) phase="${word#carrel.phase=}" ;;
    esac
done
[ -n "$job" ] || fail "no carrel.job= on the kernel command line"

while read -r module params; do
    [ -n "$module" ] || continue
    # shellcheck disable=SC2086 # params are module parameters, word-split on purpose
    insmod "/lib/modules/$module" $params || fail "insmod $module $params"
done </modules.list
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd (does the CPU model have SVM?)"
say "L1 up after $(cut -d' ' -f1 /proc/uptime) s: $(uname -r), kvm_amd nested=$(cat /sys/module/kvm_amd/parameters/nested) npt=$(cat /sys/module/kvm_amd/parameters/npt)"

ninep="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$ninep,cache=loose,ro" hostroot /host || fail "mount of the host's root (9p)"
mount -t proc proc /host/proc || fail "proc in the chroot"
mount -t sysfs sys /host/sys || fail "sysfs in the chroot"
mount -t devtmpfs dev /host/dev || fail "devtmpfs in the chroot"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o mode=1777 shm /host/dev/shm
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup 2>/dev/null
# A checkout under one of the tmpfs directories (a clone in /tmp, /root, ...) is put back
# over its tmpfs, so the test binaries and their paths are found there too.
if [ -n "$repo" ]; then
    mkdir -p /repo
    mount -o bind "/host$repo" /repo || fail "bind of the checkout $repo"
fi
for dir in /tmp /var/tmp /run /root; do
    mount -t tmpfs -o mode=1777 tmpfs "/host$dir" || fail "tmpfs on $dir"
    case "$repo" in
        "$dir"/*)
            mkdir -p "/host$repo" && mount -o bind /repo "/host$repo" || fail "the checkout $repo over the tmpfs on $dir"
            ;;
    esac
done
mount -t 9p -o "$ninep,cache=none" job "/host$job" || fail "mount of the job directory $job (9p)"
ip link set lo up 2>/dev/null

chroot /host /bin/bash "$job/job.sh" "$phase"
rc=$?
sync
say "exit $rc"
poweroff -f
sleep 10
