#!/bin/sh
# Builds the notify guest (a #![no_std] PVH ELF) for the host target with the
# bare-metal link flags, and prints the path of the result:
#   crates/notify-guest/build.sh            -> target/notify-guest/notify-guest.elf
# Honours CARGO_TARGET_DIR like cargo does.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out="${CARGO_TARGET_DIR:-$root/target}/notify-guest"
RUSTFLAGS="-C relocation-model=static -C link-arg=-nostartfiles -C link-arg=-nostdlib -C link-arg=-static -C link-arg=-Wl,--build-id=none -C link-arg=-T$here/linker.ld" \
    cargo build --quiet --release --manifest-path "$here/Cargo.toml" --target-dir "$out/cargo"
cp "$out/cargo/release/notify-guest" "$out/notify-guest.elf.tmp.$$"
mv -f "$out/notify-guest.elf.tmp.$$" "$out/notify-guest.elf"
echo "$out/notify-guest.elf"
