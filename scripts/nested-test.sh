#!/usr/bin/env bash
# The nested test machine: Carrel's tests on hardware KVM (SVM) on a host that has none.
#
#   scripts/nested-test.sh [--suites LIST] [--no-linux] [--timeout SECS] [--mem MiB]
#   scripts/nested-test.sh --desk-loop N      N short Desk boots in a row; report any hang
#   scripts/nested-test.sh --perf             the nested benchmark (perf/src/bin/nested.rs)
#   scripts/nested-test.sh --run 'COMMAND'    one command in the machine (debugging)
#
# Boots QEMU with TCG and an emulated AMD EPYC CPU (SVM, no XSAVE: QEMU 7.2's nested SVM does
# not intercept XSETBV), Debian's generic kernel (scripts/fetch-linux-kernel.sh --flavour
# generic) with kvm_amd nested=1, and a small initramfs (scripts/nested/l1-init.sh) that
# mounts this host's root filesystem read-only over virtio-9p and chroots into it: the test
# binaries built here run unchanged there, on hardware KVM. What runs:
#   - the Desk suites of vmm/core/tests: LIST of boot, screen, input, agent (default: all);
#   - the Linux guest on hardware KVM (unless --no-linux): Debian's generic vmlinux in
#     carrel-vmm with kernels/linux/build-initramfs.sh's initramfs reaches /init, and the
#     guest agent answers ping and exec over vsock (scripts/nested/linux-agent.sh);
#   - the #[ignore]d Linux desktop tests (vmm/core/tests/linux_desktop.rs) when they and
#     their image exist.
# Output: each suite's tests as they run, then a summary (suite, result, counts, seconds).
# Exit code: 0 when everything passed; the first failure's code otherwise; 124 when the
# machine ran out of time; 125 when it could not be set up.
#
# Everything it needs comes from Debian packages (scripts/provision-host.sh). It builds
# the guests and the test binaries first (cargo), unless --no-build.
# Environment: CARREL_NESTED_SCALE (deadline factor for the tests, default 4),
# CARREL_NESTED_TCG (single or multi: force QEMU's TCG threading; by default the Desk part
# runs single-threaded and the Linux part multi-threaded, see "run" below).
set -euo pipefail
# One compound command: bash reads all of it before running, so editing this file while it
# runs cannot change what it does.
{
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO_ROOT"
HARNESS_START="$(date +%s.%N)"

log() { printf 'carrel-nested: %s\n' "$*"; }
die() { printf 'carrel-nested: error: %s\n' "$*" >&2; exit 125; }

SUITES="boot,screen,input,agent"
LINUX=1
TIMEOUT=900
MEM_MIB=6144
BUILD=1
MODE=tests
DESK_LOOP=0
PERF_RUNS=5
RUN_COMMAND=""
while (($#)); do
    case "$1" in
        --suites) SUITES="${2:?--suites needs a list}"; shift 2 ;;
        --no-linux) LINUX=0; shift ;;
        --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
        --mem) MEM_MIB="${2:?--mem needs MiB}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --desk-loop) MODE=desk-loop; DESK_LOOP="${2:?--desk-loop needs a count}"; shift 2 ;;
        --perf) MODE=perf; shift ;;
        --perf-runs) PERF_RUNS="${2:?--perf-runs needs a count}"; shift 2 ;;
        --run) MODE=run; RUN_COMMAND="${2:?--run needs a command}"; shift 2 ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ "$SUITES" == none ]] && SUITES=""
SCALE="${CARREL_NESTED_SCALE:-4}"

for tool in qemu-system-x86_64 cpio gzip busybox python3 timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: run scripts/provision-host.sh"
done

# --- the L1 kernel and its modules ------------------------------------------------------
bash scripts/fetch-linux-kernel.sh --flavour generic >&2
KDIR="$REPO_ROOT/.cache/linux-generic"
KVER="$(cat "$KDIR/version")"
MODDIR="$KDIR/modules/lib/modules/$KVER"

# Prints the paths (relative to MODDIR) of MODULES and their dependencies from modules.dep,
# in an order insmod can load them, each once.
modules_with_deps() {
    local module
    for module in "$@"; do module_with_deps "$module"; done | awk '!seen[$0]++'
}
module_with_deps() {
    local path deps dep
    path="$(grep -E "(^|/)$1\.ko:" "$MODDIR/modules.dep" | head -n1 | cut -d: -f1)"
    [[ -n "$path" ]] || die "module $1 is not in $MODDIR/modules.dep"
    deps="$(grep -E "^$path:" "$MODDIR/modules.dep" | cut -d: -f2)"
    for dep in $deps; do
        dep="${dep##*/}"
        module_with_deps "${dep%.ko}"
    done
    echo "$path"
}

OUT="$REPO_ROOT/target/nested"
mkdir -p "$OUT"

build_l1_initramfs() {
    local staging applet module list
    staging="$(mktemp -d "$OUT/.l1.XXXXXX")"
    mkdir -p "$staging"/{bin,proc,sys,dev,host,lib/modules}
    install -m 0755 "$(command -v busybox)" "$staging/bin/busybox"
    readelf -lW "$staging/bin/busybox" 2>/dev/null | grep -q INTERP \
        && die "busybox is dynamically linked: install busybox-static"
    for applet in $(busybox --list); do
        [[ "$applet" == busybox ]] || ln -s busybox "$staging/bin/$applet"
    done
    install -m 0755 scripts/nested/l1-init.sh "$staging/init"
    list="$staging/modules.list"
    : >"$list"
    while read -r path; do
        mkdir -p "$staging/lib/modules/$(dirname "$path")"
        cp "$MODDIR/$path" "$staging/lib/modules/$path"
        if [[ "$path" == */kvm-amd.ko ]]; then echo "$path nested=1"; else echo "$path"; fi >>"$list"
    done < <(modules_with_deps virtio_pci virtio-rng 9pnet_virtio 9p kvm-amd)
    (cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
        | gzip -1 >"$OUT/l1-initramfs.cpio.gz"
    rm -rf "$staging"
}
build_l1_initramfs

# --- what runs inside: built here, run there ----------------------------------------------
# The same cargo invocation as scripts/test.sh, so CI reuses its build.
CARGO_TEST=(cargo test --workspace --locked --features carrel-vmm/test-probes)
declare -A TEST_BIN=()
find_test_binaries() {
    local name path
    while read -r name path; do
        TEST_BIN[$name]="$path"
    done < <("${CARGO_TEST[@]}" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    target = msg.get("target") or {}
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and "test" in target.get("kind", []) and "carrel-vmm" in msg.get("package_id", "") \
            and "/vmm/core/" in target.get("src_path", ""):
        print(target["name"], msg["executable"])
')
}

LINUX_DESKTOP=0
if ((BUILD)); then
    log "building the guests and the test binaries (cargo)"
    bash scripts/build-guests.sh
    "${CARGO_TEST[@]}" --no-run --quiet
    if [[ "$MODE" == perf ]]; then
        cargo build --release --locked --quiet -p carrel-vmm -p carrel-perf --bin carrel-vmm --bin nested
    fi
    if ((LINUX)) || [[ "$MODE" == perf ]]; then
        bash kernels/linux/build-initramfs.sh
    fi
fi
[[ "$MODE" == tests ]] && find_test_binaries
[[ -f target/guests/desk.elf ]] || die "target/guests/desk.elf is missing: run scripts/build-guests.sh"

# The L2 Linux guest: the generic vmlinux and the minimal initramfs (the agent as /init) with,
# appended, the generic kernel's virtio-mmio, vsock and rng modules and /carrel-init, which
# loads them and hands over to /init (scripts/nested/l2-init.sh).
build_l2_initramfs() {
    local staging module
    [[ -f target/guests/initramfs.cpio.gz ]] \
        || die "target/guests/initramfs.cpio.gz is missing: run kernels/linux/build-initramfs.sh"
    staging="$(mktemp -d "$OUT/.l2.XXXXXX")"
    mkdir -p "$staging/lib/modules"
    install -m 0755 scripts/nested/l2-init.sh "$staging/carrel-init"
    : >"$staging/modules.list"
    while read -r path; do
        mkdir -p "$staging/lib/modules/$(dirname "$path")"
        cp "$MODDIR/$path" "$staging/lib/modules/$path"
        echo "$path" >>"$staging/modules.list"
    done < <(modules_with_deps virtio_mmio vmw_vsock_virtio_transport virtio-rng)
    # Concatenated newc archives: the kernel unpacks both into one rootfs.
    { cat target/guests/initramfs.cpio.gz
      (cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -1
    } >"$OUT/l2-initramfs.cpio.gz"
    rm -rf "$staging"
}
if ((LINUX)) || [[ "$MODE" == perf ]]; then
    build_l2_initramfs
fi
# The Linux desktop tests run when they were built and the image is there (see the test's
# CARREL_LINUX_IMAGE; kernels/linux/build-image.sh builds it).
LINUX_IMAGE="${CARREL_LINUX_IMAGE:-$REPO_ROOT/target/guests/linux-desktop}"
if [[ "$MODE" == tests ]] && ((LINUX)) && [[ -n "${TEST_BIN[linux_desktop]:-}" ]]; then
    if [[ -f "$LINUX_IMAGE/rootfs.ext4" && -f "$LINUX_IMAGE/vmlinux" ]]; then
        LINUX_DESKTOP=1
    else
        log "the Linux desktop tests are skipped: no image in $LINUX_IMAGE (kernels/linux/build-image.sh builds it)"
    fi
fi

# --- the job: a script the L1 machine runs chrooted into this host's filesystem -----------
JOB="$OUT/job"
rm -rf "$JOB"
mkdir -p "$JOB"
{
    echo '#!/bin/bash'
    echo "# Written by scripts/nested-test.sh; runs inside the nested machine."
    printf 'REPO=%q\nJOB=%q\nSCALE=%q\nMODE=%q\nDESK_LOOP=%q\nRUN_COMMAND=%q\n' \
        "$REPO_ROOT" "$JOB" "$SCALE" "$MODE" "$DESK_LOOP" "$RUN_COMMAND"
    printf 'L2_KERNEL=%q\nL2_INITRD=%q\n' "$KDIR/vmlinux" "$OUT/l2-initramfs.cpio.gz"
    printf 'REVISION=%q\nPERF_RUNS=%q\n' "$(git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)" "$PERF_RUNS"
    # The Linux desktop test's vCPUs (vmm/core/tests/linux_desktop.rs), when asked for.
    printf 'export CARREL_LINUX_CPUS=%q\n' "${CARREL_LINUX_CPUS:-1}"
    echo "SUITES=("
    if [[ "$MODE" == tests ]]; then
        for suite in ${SUITES//,/ }; do
            [[ -n "${TEST_BIN[$suite]:-}" ]] || die "no test binary for suite '$suite' (vmm/core/tests/$suite.rs)"
            printf '  %q %q\n' "$suite" "${TEST_BIN[$suite]}"
        done
    fi
    echo ")"
    printf 'LINUX_IMAGE=%q\n' "$LINUX_IMAGE"
    printf 'LINUX=%q\nLINUX_DESKTOP=%q\nLINUX_DESKTOP_BIN=%q\n' \
        "$([[ "$MODE" == tests ]] && echo "$LINUX" || echo 0)" \
        "$([[ "$MODE" == tests ]] && echo "$LINUX_DESKTOP" || echo 0)" "${TEST_BIN[linux_desktop]:-}"
    cat scripts/nested/job.sh
} >"$JOB/job.sh"

# --- run ----------------------------------------------------------------------------------
# Each phase boots the machine once; the job runs the phase's part. QEMU 7.2's TCG fails
# this path differently per threading, so each part runs where it was seen to work:
#   desk  (Desk suites, the Desk loop): single-threaded TCG. Multi-threaded, 3 long runs of
#         short Desk boots stopped the machine after 20-56 boots (a vCPU looping on a stale
#         translation of kernel text the other had patched; an L1 kernel stack corrupted in
#         a vCPU thread), where single-threaded ran 150 in a row.
#   linux (the Linux guest, the Linux desktop tests, the benchmark): multi-threaded TCG.
#         Single-threaded, a one-vCPU Linux guest stopped 2.7 s into its boot, spinning with
#         interrupts off in an interrupt handler, and a two-vCPU one missed 240 s; it reached
#         /init in 12-15 s multi-threaded.
# --run boots the linux way (multi-threaded). CARREL_NESTED_TCG=single|multi forces one
# threading for every phase.
PHASES=()
case "$MODE" in
    tests) [[ -n "$SUITES" ]] && PHASES+=(desk); ((LINUX)) && PHASES+=(linux) ;;
    desk-loop) PHASES+=(desk) ;;
    run|perf) PHASES+=(linux) ;;
esac
case "$MODE" in
    tests) log "running: ${SUITES:+Desk suites $SUITES; }$( ((LINUX)) && echo "the Linux guest and its agent; ")$( ((LINUX_DESKTOP)) && echo "the Linux desktop tests")" ;;
    desk-loop) log "running: $DESK_LOOP Desk boots in a row" ;;
    perf) log "running: the nested benchmark (perf/src/bin/nested.rs)" ;;
    run) log "running: $RUN_COMMAND" ;;
esac
rc=0
machine_s=0
for phase in "${PHASES[@]}"; do
    case "$phase" in desk) thread=single ;; *) thread=multi ;; esac
    thread="${CARREL_NESTED_TCG:-$thread}"
    QEMU=(qemu-system-x86_64 -accel "tcg,thread=$thread" -cpu EPYC,-xsave -smp 2 -m "$MEM_MIB"
        -nodefaults -no-user-config -display none -no-reboot
        -chardev stdio,id=console,signal=off -serial chardev:console
        -device virtio-rng-pci
        -fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"
        -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
        -fsdev "local,id=job,path=$JOB,security_model=none"
        -device virtio-9p-pci,fsdev=job,mount_tag=job
        -monitor "unix:$OUT/monitor.sock,server=on,wait=off"
        -kernel "$KDIR/bzImage" -initrd "$OUT/l1-initramfs.cpio.gz"
        -append "console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off nokaslr sysrq_always_enabled carrel.job=$JOB carrel.repo=$REPO_ROOT carrel.phase=$phase")
    CONSOLE_LOG="$OUT/console-$phase.log"
    log "phase $phase: booting the nested machine: QEMU TCG ($thread-threaded), EPYC (SVM), 2 vCPUs, $MEM_MIB MiB, Linux $KVER; at most $TIMEOUT s"
    log "console: $CONSOLE_LOG; QEMU monitor: $OUT/monitor.sock (e.g. sendkey alt-sysrq-t dumps L1's tasks)"
    qemu_start="$(date +%s.%N)"
    set +e
    timeout -k 10 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>"$OUT/qemu.stderr" | sed -u 's/\r$//' | tee "$CONSOLE_LOG"
    qemu_rc="${PIPESTATUS[0]}"
    set -e
    qemu_end="$(date +%s.%N)"
    machine_s="$(python3 -c "print(round($machine_s + $qemu_end - $qemu_start, 1))")"
    phase_rc="$(sed -n 's/^carrel-nested: exit \([0-9]*\)$/\1/p' "$CONSOLE_LOG" | tail -n1)"
    if [[ -z "$phase_rc" ]]; then
        if ((qemu_rc == 124)); then
            log "phase $phase: the nested machine ran out of time ($TIMEOUT s); its console is in $CONSOLE_LOG"
            phase_rc=124
        else
            log "phase $phase: the nested machine ended (QEMU exit $qemu_rc) without a result; see $CONSOLE_LOG and $OUT/qemu.stderr"
            grep -v "TCG doesn't support requested feature" "$OUT/qemu.stderr" | sed 's/^/  qemu: /' | tail -n 20 >&2
            phase_rc=125
        fi
    fi
    ((rc != 0)) || rc="$phase_rc"
done

echo
log "summary"
if [[ -s "$JOB/summary.tsv" ]]; then
    while IFS=$'\t' read -r name result passed failed ignored seconds; do
        printf '  %-16s %-8s %4s passed %4s failed %4s ignored %8s s\n' \
            "$name" "$result" "$passed" "$failed" "$ignored" "$seconds"
    done <"$JOB/summary.tsv"
fi
harness_s="$(python3 -c "print(round($(date +%s.%N) - $HARNESS_START, 1))")"
log "nested machine (${#PHASES[@]} boot(s)): $machine_s s; harness wall time: $harness_s s"
if [[ "$MODE" == perf && -s "$JOB/perf-result.json" ]]; then
    python3 - "$JOB/perf-result.json" "$harness_s" "$machine_s" <<'EOF'
import json, sys, pathlib
path, harness_s, machine_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
result = json.loads(pathlib.Path(path).read_text())
result["harness_wall_s"] = harness_s
result["nested_machine_s"] = machine_s
out = pathlib.Path("perf/results") / f"{result['bench']}-{result['git_revision']}.json"
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"carrel-nested: perf result in {out}")
EOF
fi
log "exit $rc"
exit "$rc"
}
