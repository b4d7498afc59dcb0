#!/usr/bin/env bash
# Set up a Carrel host (development, CI or production). Idempotent: a second run
# installs nothing and prints only the KVM line.
#
#   scripts/provision-host.sh [--runtime-only] [--bench] [--systemd] [--check] [--print-unit]
#
# --runtime-only   production host that only runs Carrel: skip the Rust toolchain check.
# --bench          also the baselines the benchmarks compare against (Xvfb + xwd + netpbm).
# --systemd        also install carreld's unit (scripts/carreld.service) and its slice.
# --check          report what is missing or wrong; change nothing (exit 1 if anything is).
# --print-unit     print carreld's unit as --systemd would install it, and exit.
#
# Runs as root; re-runs itself with sudo otherwise. Non-interactive (CI=true is fine).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

log() { printf 'carrel: %s\n' "$*"; }
die() { printf 'carrel: error: %s\n' "$*" >&2; exit 1; }

RUNTIME_ONLY=0
BENCH=0
SYSTEMD=0
CHECK=0
PRINT_UNIT=0
for arg in "$@"; do
    case "$arg" in
        --runtime-only) RUNTIME_ONLY=1 ;;
        --bench) BENCH=1 ;;
        --systemd) SYSTEMD=1 ;;
        --check) CHECK=1 ;;
        --print-unit) PRINT_UNIT=1 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

# carreld's unit with this checkout's release binaries and Desk kernel.
render_unit() {
    sed -e "s|@CARRELD@|${CARRELD:-$REPO_ROOT/target/release/carreld}|" \
        -e "s|@VMM@|${CARREL_VMM:-$REPO_ROOT/target/release/carrel-vmm}|" \
        -e "s|@KERNEL@|${CARREL_KERNEL:-$REPO_ROOT/target/guests/desk.elf}|" \
        -e "s|@REPO@|$REPO_ROOT|" "$REPO_ROOT/scripts/carreld.service"
}
if ((PRINT_UNIT)); then
    render_unit
    exit 0
fi

# --- --check: report, change nothing ---------------------------------------------------
if ((CHECK)); then
    problems=0
    report() { printf 'carrel: check: %s\n' "$*"; }
    problem() { printf 'carrel: check: MISSING: %s\n' "$*"; problems=$((problems + 1)); }
    if [[ -c /dev/kvm ]]; then
        if [[ -d /sys/module/kvm_pvm ]]; then report "kvm: paravirtual kvm_pvm"
        elif [[ -d /sys/module/kvm_intel ]]; then report "kvm: hardware VMX (kvm_intel)"
        elif [[ -d /sys/module/kvm_amd ]]; then report "kvm: hardware SVM (kvm_amd)"
        else report "kvm: /dev/kvm present, no known module loaded"; fi
        [[ -r /dev/kvm && -w /dev/kvm ]] || problem "/dev/kvm is not readable and writable by $(id -un)"
    else
        problem "/dev/kvm (load kvm_intel, kvm_amd or kvm_pvm)"
    fi
    for tool in qemu-system-x86_64 lz4 readelf xz cpio busybox python3 depmod; do
        command -v "$tool" >/dev/null 2>&1 || problem "$tool (run this script without --check)"
    done
    python3 -c "import grpc, grpc_reflection" >/dev/null 2>&1 || problem "Python grpcio for the daemon tests"
    command -v cargo >/dev/null 2>&1 || ((RUNTIME_ONLY)) || problem "cargo (a Rust toolchain)"
    if [[ -f /etc/systemd/system/carreld.service ]]; then
        report "carreld unit installed"
    else
        report "carreld unit not installed (--systemd installs it)"
    fi
    if command -v systemd-analyze >/dev/null 2>&1; then
        unit_dir="$(mktemp -d)"
        render_unit >"$unit_dir/carreld.service"
        if [[ -x "${CARRELD:-$REPO_ROOT/target/release/carreld}" ]]; then
            systemd-analyze verify "$unit_dir/carreld.service" >/dev/null 2>&1 \
                && report "carreld unit: systemd-analyze verify passes" \
                || problem "carreld unit: systemd-analyze verify fails"
        else
            report "carreld unit not verified: build carreld first"
        fi
        rm -rf "$unit_dir"
    fi
    ((problems == 0)) && report "ok" || { report "$problems problem(s)"; exit 1; }
    exit 0
fi

# --- root --------------------------------------------------------------------------
if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 \
        || die "must run as root (and sudo is not installed): run it as root"
    # Keep the caller's PATH so the cargo check sees a per-user toolchain.
    exec sudo --preserve-env=CI,PATH DEBIAN_FRONTEND=noninteractive \
        bash "$REPO_ROOT/scripts/provision-host.sh" "$@"
fi

# --- Debian packages -------------------------------------------------------------------
# package -> a command it provides (checked too, so a half-removed package is reinstalled)
#   qemu-system-x86   comparison benchmarks, PVH/Linux boot tests, and the nested test
#                     machine of scripts/nested-test.sh (TCG with an emulated SVM CPU)
#   kmod              depmod for the generic kernel's modules (fetch-linux-kernel.sh)
#   lz4, binutils     Linux kernel extraction (scripts/fetch-linux-kernel.sh), guest images
#   xz-utils          compressed images and packages
#   cpio, busybox-static  the Linux guest's initramfs (kernels/linux/build-initramfs.sh)
#   ca-certificates   HTTPS to the package registries
#   systemd           systemd-analyze, which checks carreld's unit
#   mmdebstrap, e2fsprogs  the Linux agent image (kernels/linux/build-image.sh): Debian
#                     packages into a root filesystem, made an ext4 image with mkfs.ext4 -d
#   gdb               the nested machine's hang report: every thread's backtrace of a
#                     carrel-vmm that stopped making progress (scripts/nested/job.sh)
PACKAGES=(
    "qemu-system-x86:qemu-system-x86_64"
    "kmod:depmod"
    "lz4:lz4"
    "binutils:readelf"
    "xz-utils:xz"
    "cpio:cpio"
    "busybox-static:busybox"
    "ca-certificates:"
    "systemd:systemd-analyze"
    "mmdebstrap:mmdebstrap"
    "e2fsprogs:mkfs.ext4"
    "gdb:gdb"
)
# Benchmarks only (perf/src/bin/screen.rs): the screenshot path agents use today.
if ((BENCH)); then
    PACKAGES+=("xvfb:Xvfb" "x11-apps:xwd" "netpbm:pnmtopng")
fi

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    die "this script needs a Debian-family host (dpkg and apt-get not found)"
fi

pkg_installed() {
    local status
    status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]]
}

missing=()
for entry in "${PACKAGES[@]}"; do
    pkg="${entry%%:*}"
    cmd="${entry#*:}"
    if ! pkg_installed "$pkg" || { [[ -n "$cmd" ]] && ! command -v "$cmd" >/dev/null 2>&1; }; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    log "updating package lists (apt-get update)"
    apt-get update -qq || die "apt-get update failed: check network access to the Debian mirror"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed (see apt output above)"
    for pkg in "${missing[@]}"; do
        pkg_installed "$pkg" || die "package $pkg is still not installed after apt-get install"
    done
    log "installed ${missing[*]}"
fi

# --- /dev/kvm ------------------------------------------------------------------------
if [[ ! -e /dev/kvm ]]; then
    die "/dev/kvm does not exist: load a KVM module (modprobe kvm_intel or kvm_amd on bare \
metal with VMX/SVM enabled in firmware; kvm_pvm on a virtualized host) and run this again"
fi
[[ -c /dev/kvm ]] || die "/dev/kvm exists but is not a character device"
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    die "/dev/kvm is not readable and writable by $(id -un): fix its permissions \
(e.g. chmod 660 /dev/kvm; chgrp kvm /dev/kvm) and run this again"
fi
# When run through sudo, also tell whether the invoking user can use it.
if [[ -n "${SUDO_USER:-}" && "${SUDO_USER}" != "root" ]]; then
    if ! sudo -u "$SUDO_USER" test -r /dev/kvm -a -w /dev/kvm 2>/dev/null; then
        log "warning: user $SUDO_USER cannot open /dev/kvm read/write: add it to the kvm group \
(usermod -aG kvm $SUDO_USER) and log in again"
    fi
fi

if [[ -d /sys/module/kvm_pvm ]]; then
    kind="paravirtual kvm_pvm (guests emulated unless they register the VIF page; see shared PLATFORM.md)"
elif [[ -d /sys/module/kvm_intel ]]; then
    kind="hardware VMX (kvm_intel)"
elif [[ -d /sys/module/kvm_amd ]]; then
    kind="hardware SVM (kvm_amd)"
else
    kind="unknown (/dev/kvm present, but none of kvm_pvm, kvm_intel, kvm_amd is loaded)"
fi
log "kvm: $kind"

# --- Rust toolchain ----------------------------------------------------------------------
if ((RUNTIME_ONLY == 0)); then
    cargo_bin=""
    if command -v cargo >/dev/null 2>&1; then
        cargo_bin="$(command -v cargo)"
    else
        for home in "${HOME:-/root}" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)"}; do
            if [[ -n "$home" && -x "$home/.cargo/bin/cargo" ]]; then
                cargo_bin="$home/.cargo/bin/cargo"
                break
            fi
        done
    fi
    [[ -n "$cargo_bin" ]] || die "cargo not found: install a stable Rust toolchain with rustup \
(https://rustup.rs) and put ~/.cargo/bin on PATH, or pass --runtime-only on a host that only runs Carrel"
    "$cargo_bin" --version >/dev/null 2>&1 || die "$cargo_bin does not run (broken Rust toolchain?)"
fi

# --- Python test client -------------------------------------------------------------------
# The daemon's tests call carreld from a gRPC client that is not ours: Python grpcio with
# server reflection (vmm/daemon/tests/generic_client.py). Pinned, installed once.
if ((RUNTIME_ONLY == 0)); then
    if ! python3 -c "import grpc, grpc_reflection, google.protobuf" >/dev/null 2>&1; then
        command -v python3 >/dev/null 2>&1 || die "python3 not found: the daemon tests need it"
        log "installing the Python gRPC test client (grpcio, grpcio-reflection, protobuf)"
        python3 -m pip install --quiet --disable-pip-version-check \
            grpcio==1.85.3 grpcio-reflection==1.85.1 protobuf==7.36.2 \
            || die "pip install of grpcio failed: check access to PyPI"
    fi
fi

# --- carreld under systemd ----------------------------------------------------------------
if ((SYSTEMD)); then
    getent group carrel >/dev/null || { groupadd --system carrel && log "created group carrel"; }
    install -d -m 0755 /var/lib/carrel
    unit="$(render_unit)"
    if [[ "$(cat /etc/systemd/system/carreld.service 2>/dev/null)" != "$unit" ]]; then
        printf '%s\n' "$unit" >/etc/systemd/system/carreld.service
        printf '[Unit]\nDescription=Carrel agent VMs\n' >/etc/systemd/system/carrel.slice
        log "installed /etc/systemd/system/carreld.service and carrel.slice"
        if [[ -d /run/systemd/system ]]; then
            systemctl daemon-reload
        else
            log "systemd is not running here: the unit is installed, not started"
        fi
    fi
fi
