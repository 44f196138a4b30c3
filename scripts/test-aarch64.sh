#!/usr/bin/env bash
# The core library's lints and tests (kernels against their scalar
# references, golden texts, formats) built for aarch64 and run under qemu,
# so the NEON kernels are compiled and checked on an x86 machine. rustup cannot fetch another
# target's standard library here, so std is built from source (cargo's
# -Zbuild-std, allowed on a stable compiler by RUSTC_BOOTSTRAP) from
# Debian's rust-src package of the same Rust version, linked with Debian's
# aarch64 cross gcc and run by qemu-user. Needs root for apt-get; everything
# else goes into target/aarch64/.
#
#   scripts/test-aarch64.sh [cargo test arguments]
#
# Exits 0 with a SKIPPED line when the tools cannot be installed (no apt, no
# network, no rust-src of this Rust version); a failing test fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=target/aarch64
mkdir -p "$work"

skip() {
    echo "SKIPPED aarch64 tests: $*" >&2
    exit 0
}

rust_version=$(rustc --version | awk '{print $2}')
src=$work/rust-src/usr/src/rustc-$rust_version/library

if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    command -v apt-get >/dev/null || skip "no apt-get to install the cross gcc and qemu-user"
    packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)
    apt-get install -y -q "${packages[@]}" >"$work/apt.log" 2>&1 ||
        { apt-get update -q && apt-get install -y -q "${packages[@]}"; } >>"$work/apt.log" 2>&1 ||
        skip "apt-get install failed (see $work/apt.log)"
fi

if [ ! -d "$src" ]; then
    # Debian's trixie-backports carries rust-src for recent Rust versions.
    lists=$work/apt-lists
    mkdir -p "$lists/partial"
    echo "deb [trusted=yes] http://deb.debian.org/debian trixie-backports main" >"$work/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$PWD/$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$PWD/$lists" -o Dir::Cache=/tmp)
    apt-get "${apt_opts[@]}" update >"$work/apt.log" 2>&1 || skip "cannot reach trixie-backports"
    deb_version=$(apt-cache "${apt_opts[@]}" madison rust-src |
        awk -v v="$rust_version" '$3 ~ "^"v"\\+" {print $3; exit}')
    [ -n "$deb_version" ] || skip "Debian has no rust-src $rust_version"
    (cd "$work" && apt-get "${apt_opts[@]}" download "rust-src=$deb_version" >>apt.log 2>&1) ||
        skip "cannot download rust-src $deb_version"
    mkdir -p "$work/rust-src"
    dpkg-deb --fsys-tarfile "$work"/rust-src_*.deb |
        tar -x -C "$work/rust-src" --wildcards "./usr/src/rustc-$rust_version/library/*"
    rm "$work"/rust-src_*.deb
fi

# __CARGO_TESTS_ONLY_SRC_ROOT points build-std at that source instead of
# the rustup toolchain's (absent) rust-src component.
export RUSTC_BOOTSTRAP=1 __CARGO_TESTS_ONLY_SRC_ROOT=$PWD/$src
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cross=(-Zbuild-std=std,panic_unwind --target aarch64-unknown-linux-gnu --target-dir "$work" -p llama2)
cargo clippy "${cross[@]}" --all-targets -- -D warnings
cargo test "${cross[@]}" "$@"
