# Inputs of the guest images, in one place. Sourced by guest-images/build.
# Changing anything here rebuilds the images that use it.

# Debian's stock kernel package: the guest kernel (L2) and the nested test host's kernel (L1).
# Pinned to an ABI that Debian 12's main archive carries.
KERNEL_PKG="linux-image-6.1.0-50-amd64"

# Modules the guest initramfs loads, in this order; their dependencies come from
# modules.dep and are loaded first.
GUEST_MODULES="virtio_mmio virtio_pci virtio_blk virtio_net"

# Modules the nested test host (L1) loads: KVM on emulated AMD SVM, and tun for tap devices.
L1_MODULES="kvm-amd tun"

# Host tools bundled into the L1 initramfs with their shared libraries.
L1_TOOLS="/usr/bin/qemu-system-x86_64 /usr/bin/qemu-storage-daemon"

# Firmware directories the bundled QEMU reads (copied with symlinks resolved).
L1_DATA="/usr/share/qemu /usr/share/seabios"

# Debian tools bundled into the guest initramfs with their shared libraries
# (absolute paths on the build host). Empty by default.
GUEST_TOOLS=""

# Guest-side test programs built by this repository: cargo binaries built as static
# executables and installed into the guest's /usr/bin.
GUEST_RUST_BINS="evmm-guest-sysinfo evmm-guest-blk"
