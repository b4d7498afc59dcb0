#!/usr/bin/env bash
# Fetch the Debian cloud kernel used as Carrel's Linux test guest.
#
#   scripts/fetch-linux-kernel.sh [CACHE_DIR]        (default: <repo>/.cache/linux)
#
# Produces, in CACHE_DIR:
#   bzImage   the packaged boot/vmlinuz-* (Linux boot protocol, LZ4-compressed payload)
#   vmlinux   the uncompressed ELF extracted from it (64-bit entry and Xen PVH note)
#   version   the kernel release string (e.g. 6.1.0-56-cloud-amd64)
#   package   the Debian package name and version it came from
# Idempotent: does nothing when the three files exist and vmlinux is a valid ELF.
# Needs: apt-get, dpkg-deb, lz4, od (scripts/provision-host.sh installs them).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE_DIR="${1:-$REPO_ROOT/.cache/linux}"
META_PKG="linux-image-cloud-amd64"

log() { printf 'carrel: %s\n' "$*"; }
die() { printf 'carrel: error: %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb lz4 od grep; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "'$tool' not found: run scripts/provision-host.sh (or apt-get install lz4 binutils)"
done

is_elf() { [[ -f "$1" && "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" == "7f454c46" ]]; }
# bzImage: "HdrS" at offset 0x202 (Linux boot protocol header).
is_bzimage() { [[ -f "$1" && "$(dd if="$1" bs=1 skip=514 count=4 status=none)" == "HdrS" ]]; }

if is_elf "$CACHE_DIR/vmlinux" && is_bzimage "$CACHE_DIR/bzImage" && [[ -s "$CACHE_DIR/version" ]]; then
    exit 0
fi

mkdir -p "$CACHE_DIR"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"

# --- resolve the concrete kernel package -----------------------------------------------
resolve_pkg() {
    apt-cache depends "$META_PKG" 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}Depends: *<\{0,1\}\(linux-image-[^>]*\)>\{0,1\}$/\1/p' \
        | while read -r cand; do
            # First candidate that is a real package with a downloadable version.
            if apt-cache show "$cand" >/dev/null 2>&1; then echo "$cand"; break; fi
        done
}

pkg="$(resolve_pkg || true)"
if [[ -z "$pkg" ]]; then
    log "package lists do not know $META_PKG: running apt-get update"
    if [[ "$(id -u)" -eq 0 ]]; then apt-get update -qq; else sudo apt-get update -qq; fi \
        || die "apt-get update failed: check access to the Debian mirror"
    pkg="$(resolve_pkg || true)"
fi
[[ -n "$pkg" ]] || die "cannot resolve the kernel package that $META_PKG depends on \
(apt-cache depends $META_PKG shows no installable linux-image-* dependency)"
log "kernel package: $pkg (via $META_PKG)"

# --- download and unpack ---------------------------------------------------------------
work="$(mktemp -d "$CACHE_DIR/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

log "downloading $pkg (apt-get download)"
# apt-get download drops privileges to _apt when root: the directory must be writable by it.
chmod 777 "$work"
(cd "$work" && apt-get download -qq "$pkg") \
    || die "apt-get download $pkg failed (run apt-get update, check network access)"
deb="$(find "$work" -maxdepth 1 -name '*.deb' -print -quit)"
[[ -n "$deb" ]] || die "apt-get download $pkg produced no .deb"
pkg_version="$(dpkg-deb -f "$deb" Version)"

log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/root"
vmlinuz="$(find "$work/root/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)"
[[ -n "$vmlinuz" ]] || die "no boot/vmlinuz-* in $pkg"
is_bzimage "$vmlinuz" || die "$vmlinuz is not a bzImage (no HdrS header)"
kver="${vmlinuz##*/vmlinuz-}"

# --- extract vmlinux ---------------------------------------------------------------
# The compressed payload is an LZ4 legacy frame (magic 02 21 4c 18). Try every occurrence
# of the magic until one decompresses to an ELF; lz4 -dc stops with an error at the
# trailing bytes after the frame, which is expected and ignored.
log "extracting vmlinux from $(basename "$vmlinuz") (LZ4)"
extracted=0
while read -r off; do
    [[ -n "$off" ]] || continue
    tail -c "+$((off + 1))" "$vmlinuz" | lz4 -dc 2>/dev/null >"$work/vmlinux" || true
    if is_elf "$work/vmlinux"; then
        extracted=1
        log "found ELF at LZ4 frame offset $off"
        break
    fi
done < <(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$vmlinuz" | cut -d: -f1)
((extracted)) || die "no LZ4 frame in $vmlinuz decompresses to an ELF \
(is the kernel compressed with something other than LZ4?)"
if command -v readelf >/dev/null 2>&1; then
    readelf -h "$work/vmlinux" >/dev/null 2>&1 || die "extracted vmlinux is not a valid ELF (readelf -h)"
fi

# --- install into the cache (vmlinux last: it marks the cache complete) ------------------
rm -f "$CACHE_DIR/vmlinux"
cp "$vmlinuz" "$CACHE_DIR/bzImage"
printf '%s\n' "$kver" >"$CACHE_DIR/version"
printf '%s %s\n' "$pkg" "$pkg_version" >"$CACHE_DIR/package"
mv "$work/vmlinux" "$CACHE_DIR/vmlinux"
log "ready: $CACHE_DIR/{bzImage,vmlinux} (Linux $kver, $pkg $pkg_version)"
