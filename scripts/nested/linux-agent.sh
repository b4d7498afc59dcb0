#!/bin/bash
# Inside the nested machine: Debian's generic vmlinux in carrel-vmm on hardware KVM, with
# the minimal initramfs plus its modules (scripts/nested/l2-init.sh). Checks that Linux
# reaches /init, which virtio devices it binds, and that the guest agent answers ping and
# exec over vsock through carrel-vmm's control socket.
#
#   scripts/nested/linux-agent.sh VMLINUX INITRD [LOG_DIR]
#
# The guest's console goes to LOG_DIR/linux-agent-console.log (default: a /tmp directory),
# with carrel-vmm's vsock trace (CARREL_VSOCK_TRACE): a failure shows its last packets.
# Deadlines: 150 s to /init, 60 s more to the agent (the emulated machine's seconds).
# One vCPU: with QEMU's TCG single-threaded (the harness's default), the two vCPUs of an SMP
# Linux guest wait on each other through QEMU's round-robin: with two, it did not reach
# /init within 240 s (with multi-threaded TCG it did in 12-15 s).
set -u
kernel="$1"
initrd="$2"
vmm="$(dirname "$0")/../../target/debug/carrel-vmm"
dir="$(mktemp -d /tmp/linux-agent.XXXXXX)"
log="${3:-$dir}/linux-agent-console.log"
say() { echo "linux-agent: $*"; }
# The console without the vsock trace, then the trace's end.
show_log() {
    grep -v '^carrel-vmm: vsock ' "$log" | tail -n "$1" | sed 's/^/    console: /'
    grep '^carrel-vmm: vsock ' "$log" | tail -n "$2" | sed 's/^/    /'
}
fail() { say "FAIL: $*"; show_log 80 40; kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; exit 1; }

# wait_for NEEDLE SECONDS: a console line containing NEEDLE, or fail.
wait_for() {
    local deadline=$((SECONDS + $2))
    until grep -q -- "$1" "$log"; do
        kill -0 "$pid" 2>/dev/null || fail "carrel-vmm ended before '$1'"
        ((SECONDS < deadline)) || fail "no '$1' within $2 s"
        sleep 0.2
    done
}

start=$EPOCHREALTIME
CARREL_VSOCK_TRACE=1 "$vmm" run --kernel "$kernel" --initrd "$initrd" --mem 512 --cpus 1 \
    --cmdline "console=ttyS0 reboot=k panic=1 rdinit=/carrel-init" \
    --socket "$dir/vm.sock" --vsock "$dir/vm.vsock" >"$log" 2>&1 &
pid=$!
wait_for "carrel-l2: init at" 150
say "reached /init after $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s ($(grep -o 'init at .* s of guest time' "$log"))"
wait_for "carrel-l2: starting the guest agent" 60
grep 'carrel-l2: virtio' "$log" | sed 's/^/    /'
grep -q 'carrel-l2: virtio .*device 0x0013 driver vmw_vsock_virtio_transport' "$log" \
    || fail "Linux bound no vsock device (virtio device 19) to vmw_vsock_virtio_transport"

deadline=$((SECONDS + 60))
until ping="$("$vmm" agent --socket "$dir/vm.sock" ping 2>&1)"; do
    ((SECONDS < deadline)) || fail "the agent does not answer ping: $ping"
    sleep 0.5
done
say "agent ping: $ping"
out="$("$vmm" agent --socket "$dir/vm.sock" exec -- uname -r 2>&1)" || fail "agent exec uname -r: $out"
say "agent exec uname -r: $out"
[[ "$out" == *"$(basename "$(dirname "$(dirname "$kernel")")")"* || -n "$out" ]] || fail "empty uname -r"
out="$("$vmm" agent --socket "$dir/vm.sock" exec -- sh -c 'exit 7' 2>&1)"
code=$?
((code == 7)) || fail "agent exec 'exit 7' ended $code: $out"
say "agent exec 'exit 7': exit code 7"
# A connection the guest closed before its agent's first heartbeat is made again (the
# control socket's agent service does that); say so, with the packets that led there.
if grep -q 'closed a new connection before its first heartbeat' "$log"; then
    say "note: the guest closed an agent connection before its first heartbeat; the vsock trace before it:"
    grep -B 30 -m 1 'closed a new connection before its first heartbeat' "$log" | grep '^carrel-vmm: vsock ' | sed 's/^/    /'
fi
"$vmm" stop --socket "$dir/vm.sock" >/dev/null || fail "carrel-vmm stop"
wait "$pid"
say "ok"
rm -rf "$dir"  # the console log stays when it is in LOG_DIR
