/work/main/crates/probe-guest/target/release/deps/probe_guest-39257d438e711ef3.d: src/main.rs src/boot.rs src/virtio.rs Cargo.toml

/work/main/crates/probe-guest/target/release/deps/libprobe_guest-39257d438e711ef3.rmeta: src/main.rs src/boot.rs src/virtio.rs Cargo.toml

src/main.rs:
src/boot.rs:
src/virtio.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=
# env-dep:CLIPPY_CONF_DIR
