#!/usr/bin/env bash
# Build the Linux guest's minimal initramfs: the Carrel guest agent, linked statically, as
# /init, and a static busybox for the commands the agent runs (/bin/sh, ls, cat, ...). As
# PID 1 the agent mounts /proc, /sys and /dev, reaps orphans, and serves the host on vsock
# port 1024.
#
#   kernels/linux/build-initramfs.sh [OUT]      (default: <repo>/target/guests/initramfs.cpio.gz)
#
# Boot it with: carrel-vmm run --kernel vmlinux --initrd target/guests/initramfs.cpio.gz
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${1:-$REPO_ROOT/target/guests/initramfs.cpio.gz}"

die() { printf 'carrel: error: %s\n' "$*" >&2; exit 1; }
command -v cpio >/dev/null 2>&1 || die "cpio not found: run scripts/provision-host.sh"
busybox="$(command -v busybox || true)"
[[ -n "$busybox" ]] || die "busybox not found: run scripts/provision-host.sh (package busybox-static)"
if readelf -lW "$busybox" | grep -q "INTERP"; then
    die "$busybox is dynamically linked; install busybox-static"
fi

# Static glibc binary, in its own target directory so the host build's cache is untouched.
echo "carrel: building the guest agent (static)" >&2
(cd "$REPO_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
    -p carrel-guest-agent --target x86_64-unknown-linux-gnu --target-dir "$REPO_ROOT/target/static")
agent="$REPO_ROOT/target/static/x86_64-unknown-linux-gnu/release/carrel-guest-agent"
[[ -x "$agent" ]] || die "the agent binary was not built at $agent"
if readelf -lW "$agent" | grep -q "INTERP"; then
    die "$agent is dynamically linked; the initramfs has no libraries"
fi

staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging"/{bin,proc,sys,dev,tmp,root}
install -m 0755 "$agent" "$staging/init"
install -m 0755 "$busybox" "$staging/bin/busybox"
for applet in $("$busybox" --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$staging/bin/$applet"
done
mkdir -p "$(dirname "$OUT")"
(cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -9 > "$OUT"
echo "carrel: built $OUT ($(stat -c %s "$OUT") bytes)" >&2
