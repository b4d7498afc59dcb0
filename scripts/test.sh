#!/usr/bin/env bash
# Carrel's test suite, as CI runs it (.ci/run) on a fresh machine: provisions the host,
# builds the project's guests, fetches the Linux guest kernel, then runs every test of
# the workspace on real KVM, then the hardware-KVM (SVM) path in a nested machine that QEMU
# emulates (kernels/linux/build-image.sh builds the Linux desktop image, ~2 minutes cold;
# scripts/nested-test.sh runs the Desk suites, the Linux guest and the desktop tests).
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
bash kernels/linux/build-image.sh
bash scripts/nested-test.sh
