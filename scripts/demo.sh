#!/usr/bin/env bash
# Set up this host and boot an agent VM: provisions the host, builds carrel-vmm and the
# Desk kernel, boots it with its serial console on this terminal, takes a screenshot
# (target/demo/desk.png), asks the VM for its status over its control socket, and stops it.
#
#   scripts/demo.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO_ROOT"

bash scripts/provision-host.sh
bash scripts/build-guests.sh
echo "carrel: building carrel-vmm (release)" >&2
cargo build --release --quiet -p carrel-vmm

vmm="$REPO_ROOT/target/release/carrel-vmm"
socket="$(mktemp -u /tmp/carrel-demo-XXXXXX.sock)"
console="$(mktemp /tmp/carrel-demo-console-XXXXXX.log)"
"$vmm" run --kernel target/guests/desk.elf --mem 128 --socket "$socket" --console-log "$console" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$console"' EXIT

for _ in $(seq 1 500); do
    grep -q "desk: ready" "$console" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { echo "carrel: the VM exited early" >&2; exit 1; }
    sleep 0.01
done
grep -q "desk: ready" "$console" || { echo "carrel: the VM did not get ready" >&2; exit 1; }

mkdir -p target/demo
"$vmm" screenshot --socket "$socket" -o target/demo/desk.png --timeout 10
echo
"$vmm" status --socket "$socket"
"$vmm" stop --socket "$socket"
wait "$pid"
echo "carrel: VM stopped cleanly"
