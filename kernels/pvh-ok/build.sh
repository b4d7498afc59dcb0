#!/usr/bin/env bash
# Build the pvh-ok test guest.
#
#   kernels/pvh-ok/build.sh [OUT_DIR]        (default: <repo>/target/guests)
#
# Writes OUT_DIR/pvh-ok.elf and OUT_DIR/pvh-idle.elf (the same without the reset: it
# stays halted, for the snapshot benchmark's peers). Needs only binutils (as, ld).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SRC_DIR="$REPO_ROOT/kernels/pvh-ok"
OUT_DIR="${1:-$REPO_ROOT/target/guests}"

die() { printf 'carrel: error: %s\n' "$*" >&2; exit 1; }

for tool in as ld; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "'$tool' not found: install binutils (scripts/provision-host.sh does)"
done

mkdir -p "$OUT_DIR"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

build() { # NAME [as flags]
    local name="$1"; shift
    as --64 "$@" -o "$tmp/$name.o" "$SRC_DIR/ok.S"
    # -n: no page alignment of the segment in the file (keeps the image ~1 KiB);
    # no build-id so the output is reproducible.
    ld -m elf_x86_64 -n --build-id=none -T "$SRC_DIR/link.ld" -o "$tmp/$name.elf" "$tmp/$name.o"
    mv "$tmp/$name.elf" "$OUT_DIR/$name.elf"
    printf 'carrel: built %s (%s bytes)\n' "$OUT_DIR/$name.elf" "$(stat -c %s "$OUT_DIR/$name.elf")"
}
build pvh-ok
build pvh-idle --defsym IDLE=1
