#!/usr/bin/env bash
# Build the Linux agent image: a Debian bookworm desktop (Xorg on virtio-gpu, openbox,
# xterm, Firefox ESR, python3, sqlite3, xdotool) with the Carrel guest agent on vsock
# port 1024, booted by Debian's generic kernel (linux-image-amd64).
#
#   kernels/linux/build-image.sh [OUT_DIR]      (default: <repo>/target/guests/linux-desktop)
#
# Produces in OUT_DIR:
#   vmlinux      the generic kernel's ELF, cut out of the package's bzImage (XZ payload)
#   initrd.img   a small initramfs: loads virtio_mmio, virtio_blk, ext4 and switches to /dev/vda
#   rootfs.ext4  the root filesystem, a sparse raw ext4 image (the virtio-blk disk)
#   cmdline      the kernel command line to boot it with
#   version      kernel release; package: the Debian package it came from
#
# Boot it (the layer keeps the image pristine; see README "Disks"):
#   carrel-vmm run --kernel OUT/vmlinux --initrd OUT/initrd.img --mem 2048 \
#       --cmdline "$(cat OUT/cmdline)" --disk agent.layer,base=OUT/rootfs.ext4 --vsock /tmp/vm.vsock
#
# Cached and idempotent: the Debian packages (mmdebstrap) are cached by their list under
# <repo>/.cache/linux-image; a second run with unchanged inputs does nothing. Needs root
# (mmdebstrap, file ownership in the image), mmdebstrap, kmod, e2fsprogs, xz-utils, cpio,
# busybox-static and a Rust toolchain: scripts/provision-host.sh installs them.
# CARREL_GUEST_AGENT=PATH uses that static carrel-guest-agent instead of building it.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
IMAGE_SRC="$REPO_ROOT/kernels/linux/image"
OUT_DIR="${1:-$REPO_ROOT/target/guests/linux-desktop}"
CACHE_DIR="${CARREL_IMAGE_CACHE:-$REPO_ROOT/.cache/linux-image}"
META_PKG="linux-image-amd64"
SUITE="bookworm"
MIRROR="${CARREL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${CARREL_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# The disk's size as the guest sees it (sparse: only what is written takes host space).
IMAGE_SIZE="${CARREL_IMAGE_SIZE:-4G}"

START=$SECONDS
log() { printf 'carrel: [%3ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() { printf 'carrel: error: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "run as root (mmdebstrap and the image's file ownership need it)"
for tool in mmdebstrap apt-get apt-cache dpkg-deb depmod modprobe mkfs.ext4 xz cpio gzip sha256sum readelf; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: run scripts/provision-host.sh"
done
busybox="$(command -v busybox || true)"
[[ -n "$busybox" ]] && ! readelf -lW "$busybox" | grep INTERP >/dev/null \
    || die "a static busybox is needed for the initramfs: install busybox-static"

mkdir -p "$CACHE_DIR" "$OUT_DIR"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

# --- 1. the generic kernel --------------------------------------------------------------
# The same concrete package scripts/nested-test.sh resolves: what linux-image-amd64
# depends on in this host's package lists.
resolve_kernel_pkg() {
    apt-cache depends "$META_PKG" 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}Depends: *<\{0,1\}\(linux-image-[^>]*\)>\{0,1\}$/\1/p' | awk 'NR == 1'
}
kpkg="$(resolve_kernel_pkg || true)"
if [[ -z "$kpkg" ]]; then
    log "package lists do not know $META_PKG: apt-get update"
    apt-get update -qq || die "apt-get update failed: check access to the Debian mirror"
    kpkg="$(resolve_kernel_pkg || true)"
fi
[[ -n "$kpkg" ]] || die "cannot resolve the package behind $META_PKG (apt-cache depends $META_PKG)"
kdir="$CACHE_DIR/kernel/$kpkg"
if [[ ! -f "$kdir/done" ]]; then
    log "downloading $kpkg"
    rm -rf "$kdir" && mkdir -p "$kdir/deb"
    chmod 777 "$kdir/deb"   # apt-get download runs as _apt when root
    (cd "$kdir/deb" && apt-get download -qq "$kpkg") || die "apt-get download $kpkg failed"
    deb="$(find "$kdir/deb" -name '*.deb' -print -quit)"
    dpkg-deb -x "$deb" "$kdir/root"
    printf '%s %s\n' "$kpkg" "$(dpkg-deb -f "$deb" Version)" >"$kdir/package"
    vmlinuz="$(find "$kdir/root/boot" -name 'vmlinuz-*' -print -quit)"
    [[ -n "$vmlinuz" ]] || die "no boot/vmlinuz-* in $kpkg"
    basename "$vmlinuz" | sed 's/^vmlinuz-//' >"$kdir/version"
    # The bzImage's payload is an XZ stream (Debian's generic kernels): try each XZ magic
    # until one decompresses to an ELF; xz complains about the bytes after the stream.
    log "extracting vmlinux from $(basename "$vmlinuz")"
    while read -r offset; do
        tail -c "+$((offset + 1))" "$vmlinuz" | xz -dcq 2>/dev/null >"$kdir/vmlinux" || true
        [[ "$(head -c 4 "$kdir/vmlinux" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]] && break
        rm -f "$kdir/vmlinux"
    done < <(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | cut -d: -f1)
    [[ -f "$kdir/vmlinux" ]] || die "no XZ stream in $vmlinuz decompresses to an ELF"
    kver="$(cat "$kdir/version")"
    depmod -b "$kdir/root" "$kver"
    rm -rf "$kdir/deb"
    touch "$kdir/done"
fi
kver="$(cat "$kdir/version")"
kmods="$kdir/root/lib/modules/$kver"
log "kernel: $(cat "$kdir/package") (Linux $kver)"

# --- 2. the Debian packages (mmdebstrap), cached by their list ---------------------------
packages="$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$IMAGE_SRC/packages" | sort -u | paste -sd, -)"
base_key="$(printf '%s\n' "$SUITE" "$MIRROR" "$SECURITY_MIRROR" "$packages" | sha256sum | cut -c1-16)"
base_dir="$CACHE_DIR/base-$base_key"
if [[ ! -d "$base_dir" ]]; then
    log "mmdebstrap $SUITE with: ${packages//,/ }"
    rm -rf "$base_dir.partial"
    log "(downloads about 150 MB from $MIRROR; takes a few minutes)"
    # Without manuals, translations and documentation (copyright files stay): ~110 MB less.
    mmdebstrap --variant=minbase --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --include="$packages" \
        --customize-hook='chroot "$1" apt-get clean' \
        --format=directory "$SUITE" "$base_dir.partial" \
        "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
        "deb $SECURITY_MIRROR $SUITE-security main" \
        || die "mmdebstrap failed (see above): check access to $MIRROR"
    mv "$base_dir.partial" "$base_dir"
    find "$CACHE_DIR" -maxdepth 1 -name 'base-*' ! -name "$(basename "$base_dir")" -exec rm -rf {} +
fi
log "packages: $(basename "$base_dir") ($(du -sm "$base_dir" | cut -f1) MiB)"

# --- 3. the guest agent, static ----------------------------------------------------------
# CARREL_GUEST_AGENT names one already built (the same command as below) and skips cargo.
agent="${CARREL_GUEST_AGENT:-}"
if [[ -z "$agent" ]]; then
    log "building carrel-guest-agent (static)"
    (cd "$REPO_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
        -p carrel-guest-agent --target x86_64-unknown-linux-gnu --target-dir "$REPO_ROOT/target/static")
    agent="$REPO_ROOT/target/static/x86_64-unknown-linux-gnu/release/carrel-guest-agent"
fi
[[ -x "$agent" ]] && ! readelf -lW "$agent" | grep INTERP >/dev/null || die "no static agent at $agent"

# --- 4. is the image up to date? -----------------------------------------------------------
inputs_key="$( {
    printf '%s\n' "$base_key" "$(cat "$kdir/package")" "$IMAGE_SIZE"
    sha256sum "$0" "$agent" "$busybox"
    find "$IMAGE_SRC" -type f | LC_ALL=C sort | xargs sha256sum
    find "$IMAGE_SRC" -type f -printf '%p %m\n' | LC_ALL=C sort
} | sed "s|$REPO_ROOT||g" | sha256sum | cut -c1-32)"
outputs=(vmlinux initrd.img rootfs.ext4 cmdline version package)
up_to_date=1
for file in "${outputs[@]}"; do [[ -f "$OUT_DIR/$file" ]] || up_to_date=0; done
if ((up_to_date)) && [[ "$(cat "$OUT_DIR/.inputs" 2>/dev/null)" == "$inputs_key" ]]; then
    log "up to date: $OUT_DIR"
    exit 0
fi
rm -f "$OUT_DIR/.inputs"

work="$(mktemp -d "$CACHE_DIR/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Modules by name -> their files with dependencies, in load order (modprobe --show-depends).
module_files() {
    local name
    for name in "$@"; do
        modprobe -d "$kdir/root" -S "$kver" --show-depends "$name" \
            || die "module $name is not in $kpkg"
    done | sed -n 's/^insmod \([^ ]*\).*/\1/p' | awk '!seen[$0]++'
}
mapfile -t initramfs_mods < <(awk '$1 == "initramfs" { print $2 }' "$IMAGE_SRC/modules")
mapfile -t rootfs_mods < <(awk '$1 == "rootfs" || $1 == "initramfs" { print $2 }' "$IMAGE_SRC/modules")

# --- 5. the root filesystem -------------------------------------------------------------
log "assembling the root filesystem"
root="$work/root"
mkdir -p "$root"
cp -a "$base_dir/." "$root/"
cp -a "$IMAGE_SRC/rootfs/." "$root/"
install -D -m 0755 "$agent" "$root/usr/local/bin/carrel-guest-agent"
# busybox init is PID 1; poweroff/reboot/halt are busybox's (no systemd-sysv here).
ln -sf /bin/busybox "$root/sbin/init"
for applet in poweroff reboot halt; do ln -sf /bin/busybox "$root/sbin/$applet"; done
# (Into a variable first, and `grep >/dev/null` rather than -q elsewhere: a reader that
# ends a pipe early fails it under pipefail.)
applets="$(chroot "$root" /bin/busybox --list)"
grep -qx init <<<"$applets" || die "Debian's busybox has no init applet"
# The kernel's modules: the listed ones and what they need, with depmod's indexes.
moddir="$root/usr/lib/modules/$kver"
mkdir -p "$moddir"
cp "$kmods"/modules.builtin "$kmods"/modules.builtin.modinfo "$kmods"/modules.order "$moddir/"
while read -r file; do
    rel="${file#"$kmods"/}"
    install -D -m 0644 "$file" "$moddir/$rel"
done < <(module_files "${rootfs_mods[@]}")
depmod -b "$root" "$kver"
printf '%s\n' "$kver" >"$root/etc/carrel/kernel-release"
rootfs_bytes="$(du -sb "$root" | cut -f1)"
log "root filesystem: $((rootfs_bytes >> 20)) MiB in files; making a $IMAGE_SIZE ext4 image"
rm -f "$work/rootfs.ext4"
# Inode tables and journal written now, so the guest's first boot does not spend its
# time (and the layer's space) on lazy init.
mkfs.ext4 -q -F -L carrel-root -m 1 -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$root" "$work/rootfs.ext4" "$IMAGE_SIZE" || die "mkfs.ext4 -d failed"

# --- 6. the initramfs -------------------------------------------------------------------
log "making the initramfs"
initrd="$work/initrd"
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,lib/modules}
install -m 0755 "$busybox" "$initrd/bin/busybox"
for applet in $("$busybox" --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$initrd/bin/$applet"
done
install -m 0755 "$IMAGE_SRC/initramfs-init" "$initrd/init"
while read -r file; do
    install -m 0644 "$file" "$initrd/lib/modules/$(basename "$file")"
    basename "$file" >>"$initrd/lib/modules/load-order"
done < <(module_files "${initramfs_mods[@]}")
(cd "$initrd" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -9 >"$work/initrd.img"

# --- 7. install (the stamp last: it marks the outputs complete) ---------------------------
cp "$kdir/vmlinux" "$work/vmlinux"
cp "$kdir/version" "$work/version"
cp "$kdir/package" "$work/package"
# ACPI finds the devices; the serial console on ttyS0; the root disk is the first virtio-blk.
echo "console=ttyS0 root=/dev/vda rw quiet loglevel=4" >"$work/cmdline"
for file in "${outputs[@]}"; do mv "$work/$file" "$OUT_DIR/$file"; done
printf '%s\n' "$inputs_key" >"$OUT_DIR/.inputs"
log "built $OUT_DIR: vmlinux $(($(stat -c %s "$OUT_DIR/vmlinux") >> 20)) MiB, initrd.img \
$(($(stat -c %s "$OUT_DIR/initrd.img") >> 10)) KiB, rootfs.ext4 $IMAGE_SIZE \
($(($(du -k "$OUT_DIR/rootfs.ext4" | cut -f1) >> 10)) MiB allocated)"
