#!/bin/sh
# Builds the probe guest (a #![no_std] PVH ELF) for the host target with the
# bare-metal link flags, and prints the path of the result:
#   crates/probe-guest/build.sh            -> target/probe-guest/probe.elf
# Honours CARGO_TARGET_DIR like cargo does.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="${CARGO_TARGET_DIR:-$root/target}/probe-guest"
RUSTFLAGS="-C relocation-model=static -C link-arg=-nostartfiles -C link-arg=-nostdlib -C link-arg=-static -C link-arg=-Wl,--build-id=none -C link-arg=-T$here/linker.ld" \
    cargo build --quiet --release --manifest-path "$here/Cargo.toml" --target-dir "$out/cargo"
cp "$out/cargo/release/probe-guest" "$out/probe.elf.tmp.$$"
mv -f "$out/probe.elf.tmp.$$" "$out/probe.elf"
echo "$out/probe.elf"
