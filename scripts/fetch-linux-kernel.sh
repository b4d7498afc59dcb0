#!/usr/bin/env bash
# Fetch a Debian kernel for Carrel's Linux guests (and the nested test machine).
#
#   scripts/fetch-linux-kernel.sh [--flavour cloud|generic] [CACHE_DIR]
#
# cloud (default)  linux-image-cloud-amd64, cached in <repo>/.cache/linux: the test guest.
# generic          linux-image-amd64, cached in <repo>/.cache/linux-generic: the kernel of
#                  the nested test machine (scripts/nested-test.sh) and of Linux guests that
#                  need the modules the cloud kernel lacks (kvm_amd, virtio-gpu, input).
#
# Produces, in CACHE_DIR:
#   bzImage   the packaged boot/vmlinuz-* (Linux boot protocol, compressed payload)
#   vmlinux   the uncompressed ELF extracted from it (64-bit entry and Xen PVH note)
#   version   the kernel release string (e.g. 6.1.0-56-cloud-amd64)
#   package   the Debian package name and version it came from
#   modules/  (generic only) modules/lib/modules/<version>: the package's modules, with the
#             modules.dep that depmod writes (use as modprobe -d / depmod -b base)
# Idempotent: does nothing when those files exist and vmlinux is a valid ELF.
# Needs: apt-get, dpkg-deb, lz4, xz, od, depmod (scripts/provision-host.sh installs them).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"

log() { printf 'carrel: %s\n' "$*"; }
die() { printf 'carrel: error: %s\n' "$*" >&2; exit 1; }

FLAVOUR=cloud
CACHE_DIR=""
while (($#)); do
    case "$1" in
        --flavour) [[ $# -ge 2 ]] || die "--flavour needs cloud or generic"; FLAVOUR="$2"; shift 2 ;;
        --flavour=*) FLAVOUR="${1#--flavour=}"; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown argument '$1' (try --help)" ;;
        *) CACHE_DIR="$1"; shift ;;
    esac
done
case "$FLAVOUR" in
    cloud) META_PKG="linux-image-cloud-amd64"; KEEP_MODULES=0
           CACHE_DIR="${CACHE_DIR:-$REPO_ROOT/.cache/linux}" ;;
    generic) META_PKG="linux-image-amd64"; KEEP_MODULES=1
             CACHE_DIR="${CACHE_DIR:-$REPO_ROOT/.cache/linux-generic}" ;;
    *) die "unknown flavour '$FLAVOUR' (cloud or generic)" ;;
esac

for tool in apt-get apt-cache dpkg-deb lz4 od grep; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "'$tool' not found: run scripts/provision-host.sh (or apt-get install lz4 binutils)"
done

is_elf() { [[ -f "$1" && "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" == "7f454c46" ]]; }
# bzImage: "HdrS" at offset 0x202 (Linux boot protocol header).
is_bzimage() { [[ -f "$1" && "$(dd if="$1" bs=1 skip=514 count=4 status=none)" == "HdrS" ]]; }

if is_elf "$CACHE_DIR/vmlinux" && is_bzimage "$CACHE_DIR/bzImage" && [[ -s "$CACHE_DIR/version" ]] \
    && { ((KEEP_MODULES == 0)) || [[ -s "$CACHE_DIR/modules/lib/modules/$(cat "$CACHE_DIR/version")/modules.dep" ]]; }; then
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
# Debian's payload is an LZ4 legacy frame (magic 02 21 4c 18); XZ (fd 37 7a 58 5a 00) is
# tried too. Try every occurrence of a magic until one decompresses to an ELF; the
# decompressor stops with an error at the trailing bytes after the frame, which is expected
# and ignored.
extracted=0
try_magic() { # NAME MAGIC-REGEX DECOMPRESS-COMMAND...
    local name="$1" magic="$2" off
    shift 2
    while read -r off; do
        [[ -n "$off" ]] || continue
        tail -c "+$((off + 1))" "$vmlinuz" | "$@" 2>/dev/null >"$work/vmlinux" || true
        if is_elf "$work/vmlinux"; then
            log "extracted vmlinux from $(basename "$vmlinuz") ($name frame at offset $off)"
            return 0
        fi
    done < <(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" | cut -d: -f1)
    return 1
}
try_magic LZ4 '\x02\x21\x4c\x18' lz4 -dc && extracted=1
((extracted)) || { command -v xz >/dev/null 2>&1 && try_magic XZ '\xfd\x37\x7a\x58\x5a\x00' xz -dc && extracted=1; } || true
((extracted)) || die "no LZ4 or XZ frame in $vmlinuz decompresses to an ELF \
(is the kernel compressed another way?)"
if command -v readelf >/dev/null 2>&1; then
    readelf -h "$work/vmlinux" >/dev/null 2>&1 || die "extracted vmlinux is not a valid ELF (readelf -h)"
fi

# --- install into the cache (vmlinux last: it marks the cache complete) ------------------
rm -f "$CACHE_DIR/vmlinux"
if ((KEEP_MODULES)); then
    # The package leaves modules.dep to its postinst: write it here with depmod.
    depmod="$(PATH="$PATH:/sbin:/usr/sbin" command -v depmod || true)"
    [[ -n "$depmod" ]] || die "depmod not found: run scripts/provision-host.sh (package kmod)"
    [[ -d "$work/root/lib/modules/$kver" ]] || die "no lib/modules/$kver in $pkg"
    "$depmod" -b "$work/root" "$kver" || die "depmod -b $work/root $kver failed"
    rm -rf "$CACHE_DIR/modules"
    mkdir -p "$CACHE_DIR/modules/lib/modules"
    mv "$work/root/lib/modules/$kver" "$CACHE_DIR/modules/lib/modules/$kver"
fi
cp "$vmlinuz" "$CACHE_DIR/bzImage"
printf '%s\n' "$kver" >"$CACHE_DIR/version"
printf '%s %s\n' "$pkg" "$pkg_version" >"$CACHE_DIR/package"
mv "$work/vmlinux" "$CACHE_DIR/vmlinux"
log "ready: $CACHE_DIR/{bzImage,vmlinux} (Linux $kver, $pkg $pkg_version)"
