#!/usr/bin/env bash
# Build Carrel's own guests into target/guests/:
#   desk.elf    the Desk kernel (no_std, bare-metal profile, its own cargo workspace)
#   pvh-ok.elf  the tiny PVH boot test image (and pvh-idle.elf, which stays halted)
#
#   scripts/build-guests.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="$REPO_ROOT/target/guests"
mkdir -p "$OUT_DIR"

echo "carrel: building the Desk kernel" >&2
# The Desk kernel's .cargo/config.toml (target, no red zone, no C runtime) applies only
# when cargo runs from its directory. Host RUSTFLAGS would replace those flags: unset it.
(cd "$REPO_ROOT/kernels/desk" && env -u RUSTFLAGS cargo build --release --quiet --target-dir "$REPO_ROOT/target/desk")
cp "$REPO_ROOT/target/desk/x86_64-unknown-linux-gnu/release/desk" "$OUT_DIR/desk.elf"
echo "carrel: built $OUT_DIR/desk.elf ($(stat -c %s "$OUT_DIR/desk.elf") bytes)" >&2

"$REPO_ROOT/kernels/pvh-ok/build.sh" "$OUT_DIR" >&2
