#!/usr/bin/env bash
# Build Firecracker from a source checkout, for perf/hibernate's --firecracker side.
#
#   perf/build-firecracker.sh SRC_DIR [MICRO_HTTP_DIR]
#
# SRC_DIR: a Firecracker checkout (v1.16.1: git clone --branch v1.16.1
# https://github.com/firecracker-microvm/firecracker). Firecracker takes its HTTP crate
# from git; on a host that reaches crates.io but not GitHub, pass a checkout of
# firecracker-microvm/micro-http at the revision Firecracker's Cargo.lock names as
# MICRO_HTTP_DIR. Installs the Debian packages its build needs (libclang for bindgen,
# libseccomp). Builds with the host's toolchain (its rust-toolchain.toml is set aside),
# for the gnu target (so with Firecracker's empty default seccomp filter), and prints the
# binary's path.
set -euo pipefail

die() { printf 'carrel: error: %s\n' "$*" >&2; exit 1; }

src="${1:-}"
micro_http="${2:-}"
[[ -n "$src" && -f "$src/src/firecracker/Cargo.toml" ]] || die "usage: $0 FIRECRACKER_SRC_DIR [MICRO_HTTP_DIR]"
src="$(cd "$src" && pwd)"

missing=()
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
dpkg -s libseccomp-dev >/dev/null 2>&1 || missing+=(libseccomp-dev)
if ((${#missing[@]})); then
    echo "carrel: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

args=(build --release -p firecracker)
if [[ -n "$micro_http" ]]; then
    micro_http="$(cd "$micro_http" && pwd)"
    args+=(--config "patch.'https://github.com/firecracker-microvm/micro-http'.micro_http.path='$micro_http'")
fi
echo "carrel: building Firecracker in $src (a few minutes on 2 cores)" >&2
(cd "$src" && RUSTUP_TOOLCHAIN="${RUSTUP_TOOLCHAIN:-stable}" cargo "${args[@]}" >&2)
binary="$src/build/cargo_target/release/firecracker"
[[ -x "$binary" ]] || die "no binary at $binary"
"$binary" --version | head -1 >&2
echo "$binary"
