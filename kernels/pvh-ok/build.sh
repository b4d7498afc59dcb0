#!/usr/bin/env bash
# Build the pvh-ok test guest.
#
#   kernels/pvh-ok/build.sh [OUT_DIR]        (default: <repo>/target/guests)
#
# Writes OUT_DIR/pvh-ok.elf. Needs only binutils (as, ld).
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

as --64 -o "$tmp/ok.o" "$SRC_DIR/ok.S"
# -n: no page alignment of the segment in the file (keeps the image ~1 KiB);
# no build-id so the output is reproducible.
ld -m elf_x86_64 -n --build-id=none -T "$SRC_DIR/link.ld" -o "$tmp/pvh-ok.elf" "$tmp/ok.o"
mv "$tmp/pvh-ok.elf" "$OUT_DIR/pvh-ok.elf"
printf 'carrel: built %s (%s bytes)\n' "$OUT_DIR/pvh-ok.elf" "$(stat -c %s "$OUT_DIR/pvh-ok.elf")"
