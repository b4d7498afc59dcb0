# The body of the job the nested machine runs (scripts/nested-test.sh prepends its
# settings: REPO, JOB, SCALE, MODE, SUITES, ...). Runs chrooted into the host's filesystem
# with /tmp on tmpfs; writes each suite's output and summary.tsv into $JOB.
set -u
PHASE="${1:-all}"  # desk: the Desk suites; linux: the Linux guest and desktop; all: both
cd "$REPO" || exit 125
export HOME=/tmp TMPDIR=/tmp PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export CARREL_PREBUILT_GUESTS=1 CARREL_DEADLINE_SCALE="$SCALE" RUST_BACKTRACE=1

say() { echo "carrel-nested: $*"; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$JOB/summary.tsv"; }
overall=0
fail_with() { [ "$overall" -ne 0 ] || overall="$1"; }
VMM="$REPO/target/debug/carrel-vmm"

# CPU time (user + system, in clock ticks) a task has used: fields 14 and 15 of its stat,
# counted after the command name, which may hold spaces.
cpu_ticks() { sed 's/.*) //' "$1/stat" 2>/dev/null | awk '{ print $12 + $13 }'; }

# Every carrel-vmm's threads (for a hang): name, state, wait channel, CPU time used over
# two seconds (a thread spinning shows ~200 ticks), kernel stack; then every thread's
# backtrace from gdb.
dump_vmms() {
    local pid task
    declare -A before=()
    for task in /proc/[0-9]*/task/*; do
        grep -qs carrel-vmm "${task%/task/*}/cmdline" && before[$task]="$(cpu_ticks "$task")"
    done
    sleep 2
    for pid in $(pgrep -f carrel-vmm); do
        echo "--- pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline")"
        for task in /proc/"$pid"/task/*; do
            echo "  task ${task##*/} $(cat "$task/comm") state=$(awk '/^State/ {print $2}' "$task/status") wchan=$(cat "$task/wchan") cpu-ticks-in-2s=$(( $(cpu_ticks "$task") - ${before[$task]:-0} ))"
            timeout 5 sed 's/^/    /' "$task/stack" 2>/dev/null
        done
        if command -v gdb >/dev/null; then
            timeout 120 gdb -q -batch -p "$pid" -ex 'thread apply all bt 30' 2>/dev/null \
                | grep -E '^(Thread|#)' | sed 's/^/    /'
        fi
    done
}

# L1's KVM keeps a trace of the interrupts it routes and injects (ftrace, a ring buffer
# of the last ~2 MiB per CPU): a hung guest's last interrupts show whether a device's
# irqfd fired, reached the IOAPIC and the LAPIC, and was injected, and what the guest
# last wrote to its APIC (EOIs, timer counts).
TRACE=/sys/kernel/tracing
start_kvm_trace() {
    [ -e "$TRACE/events" ] || mount -t tracefs nodev "$TRACE" 2>/dev/null || return
    local event
    echo 2048 >"$TRACE/buffer_size_kb" 2>/dev/null
    for event in kvm_set_irq kvm_ioapic_set_irq kvm_apic_accept_irq kvm_inj_virq kvm_eoi kvm_apic kvm_vcpu_wakeup; do
        echo 1 >"$TRACE/events/kvm/$event/enable" 2>/dev/null
    done
    echo 1 >"$TRACE/tracing_on" 2>/dev/null
}
dump_kvm_trace() {
    [ -r "$TRACE/trace" ] || return
    echo "--- L1's KVM interrupt trace, last 120 events (pid-tid: the vCPU thread)"
    grep -v '^#' "$TRACE/trace" | tail -n 120 | sed 's/^/    /'
}

# run_suite NAME SECONDS COMMAND...: runs a libtest binary, records its counts and time.
run_suite() {
    local name="$1" limit="$2" start rc result line passed=0 failed=0 ignored=0 watchdog
    shift 2
    say "suite $name: $*"
    start="$(now)"
    ( sleep "$((limit - 150))"; say "suite $name still running after $((limit - 150)) s: the VMMs' threads"; dump_vmms; dump_kvm_trace ) &
    watchdog=$!
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$JOB/$name.log"
    rc="${PIPESTATUS[0]}"
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    line="$(grep -E '^test result: ' "$JOB/$name.log" | tail -n1)"
    if [ -n "$line" ]; then
        passed="$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$line")"
        failed="$(sed -n 's/.* \([0-9]*\) failed.*/\1/p' <<<"$line")"
        ignored="$(sed -n 's/.* \([0-9]*\) ignored.*/\1/p' <<<"$line")"
    fi
    case "$rc" in 0) result=ok ;; 124|137) result=TIMEOUT ;; *) result=FAILED ;; esac
    say "suite $name: $result ($passed passed, $failed failed, $ignored ignored) in $(since "$start") s"
    record "$name" "$result" "$passed" "$failed" "$ignored" "$(since "$start")"
    [ "$rc" -eq 0 ] || fail_with "$rc"
}

# QEMU's multi-threaded TCG can leave one vCPU executing a stale translation of kernel text
# that the other has just patched: with KVM, jump labels in the scheduler are patched
# (text_poke_bp's int3, then the original bytes) each time the first VM of the machine is
# created and the last destroyed (preempt notifiers, the LAPIC's software-disabled key).
# Seen at the 56th of a row of short Desk boots: a vCPU trapped on int3 at a jump-label
# site in __schedule whose memory holds the NOP again, forever, with interrupts off, and the
# machine stopped. A VM with an in-kernel irqchip and a vCPU, held for the whole job, keeps
# those keys enabled, so the tests' VMs come and go without patching kernel text.
python3 -c '
import fcntl, os, signal, sys
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(kvm, 0xAE01, 0)    # KVM_CREATE_VM
fcntl.ioctl(vm, 0xAE60, 0)          # KVM_CREATE_IRQCHIP
fcntl.ioctl(vm, 0xAE41, 0)          # KVM_CREATE_VCPU 0 (never run)
open(sys.argv[1], "w").close()
signal.pause()
' /tmp/kvm-holder.ready &
for ((tenth = 0; tenth < 300; tenth++)); do [ -e /tmp/kvm-holder.ready ] && break; sleep 0.1; done
[ -e /tmp/kvm-holder.ready ] || say "warning: the VM that keeps KVM's jump labels enabled did not start"

say "job: $MODE (phase $PHASE) on $(uname -r), $(nproc) CPUs, /dev/kvm: $(ls /sys/module | grep -E '^kvm_(amd|intel|pvm)$' | tr '\n' ' ')"
start_kvm_trace
case "$MODE" in
tests)
    if [ "$PHASE" != linux ]; then
        for ((i = 0; i < ${#SUITES[@]}; i += 2)); do
            run_suite "${SUITES[i]}" 360 "${SUITES[i + 1]}"
        done
    fi
    [ "$PHASE" != desk ] || exit "$overall"
    if [ "$LINUX" = 1 ]; then
        run_suite linux-agent 300 bash "$REPO/scripts/nested/linux-agent.sh" "$L2_KERNEL" "$L2_INITRD" "$JOB"
    fi
    if [ "$LINUX_DESKTOP" = 1 ]; then
        # Screenshots land in the job directory, on the host, for people to look at.
        CARREL_LINUX_IMAGE="$LINUX_IMAGE" CARREL_ARTIFACTS_DIR="$JOB/linux-desktop" \
            run_suite linux_desktop 600 "$LINUX_DESKTOP_BIN" --ignored
    fi
    ;;
desk-loop)
    # Short Desk boots in a row (desk.exit=1 powers off after 10 ticks); a run that has not
    # ended after 60 s is a hang: its threads' stacks are printed, then it is killed.
    hung=0
    times=()
    start_all="$(now)"
    for ((i = 1; i <= DESK_LOOP; i++)); do
        out="/tmp/desk-$i.log"
        start="$(now)"
        echo "run $i start $(cut -d' ' -f1 /proc/uptime)" >>"$JOB/progress"
        "$VMM" run --kernel "$REPO/target/guests/desk.elf" --cmdline desk.exit=1 >"$out" 2>&1 &
        pid=$!
        for ((tenth = 0; tenth < 600; tenth++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            hung=$((hung + 1))
            say "run $i: HUNG after 60 s; its threads, then its output so far:"
            dump_vmms
            dump_kvm_trace
            sed 's/^/    /' "$out"
            cp "$out" "$JOB/desk-hang-$i.log"
            kill -9 "$pid"
        fi
        wait "$pid"
        rc=$?
        t="$(since "$start")"
        times+=("$t")
        if [ "$rc" -ne 0 ] || ! grep -q 'desk: 10 ticks in' "$out"; then
            say "run $i: exit $rc after $t s"
            grep -q 'desk: 10 ticks in' "$out" || { sed 's/^/    /' "$out" | tail -n 20; }
            [ "$rc" -ne 0 ] && fail_with 1
        fi
        ((i % 10 == 0)) && say "$i runs, $hung hung, last $t s"
    done
    say "desk loop: $DESK_LOOP runs, $hung hung, in $(since "$start_all") s; seconds per run: ${times[*]}"
    record desk-loop "$([ "$hung" -eq 0 ] && echo ok || echo HUNG)" "$((DESK_LOOP - hung))" "$hung" 0 "$(since "$start_all")"
    [ "$hung" -eq 0 ] || fail_with 1
    ;;
perf)
    start="$(now)"
    # The Linux agent image, when built: its desktop in both VMMs too.
    desktop=()
    [ -f "$LINUX_IMAGE/rootfs.ext4" ] && desktop=(--desktop "$LINUX_IMAGE")
    CARREL_PERF_OUT="$JOB/perf-result.json" CARREL_PERF_REVISION="$REVISION" "$REPO/target/release/nested" \
        --kernel "$L2_KERNEL" --initrd "$L2_INITRD" --vmm "$REPO/target/release/carrel-vmm" --runs "$PERF_RUNS" \
        "${desktop[@]}" \
        2>&1 | tee "$JOB/perf.log"
    rc="${PIPESTATUS[0]}"
    record perf "$([ "$rc" -eq 0 ] && echo ok || echo FAILED)" - - - "$(since "$start")"
    [ "$rc" -eq 0 ] || fail_with "$rc"
    ;;
run)
    start="$(now)"
    bash -c "$RUN_COMMAND"
    rc=$?
    record run "$([ "$rc" -eq 0 ] && echo ok || echo FAILED)" - - - "$(since "$start")"
    [ "$rc" -eq 0 ] || fail_with "$rc"
    ;;
esac
exit "$overall"
