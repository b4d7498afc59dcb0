#!/usr/bin/env bash
# Carrel's test suite, as CI runs it (.ci/run) on a fresh machine: provisions the host,
# builds the project's guests, fetches the Linux guest kernel, then runs every test of
# the workspace on real KVM, then the hardware-KVM (SVM) path in a nested machine that QEMU
# emulates (scripts/nested-test.sh: the Desk suites and the Linux guest; ~3-10 minutes).
#
#   scripts/test.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO_ROOT"

bash scripts/provision-host.sh
bash scripts/build-guests.sh
bash scripts/fetch-linux-kernel.sh
cargo fmt --all -- --check
cargo test --workspace --locked --features carrel-vmm/test-probes
bash scripts/nested-test.sh
