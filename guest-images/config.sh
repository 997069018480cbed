# Inputs of the guest images, in one place. Sourced by guest-images/build.
# Changing anything here rebuilds the images that use it.

# Debian's stock kernel package: the guest kernel (L2) and the nested test host's kernel (L1).
# Pinned to an ABI that Debian 12's main archive carries.
KERNEL_PKG="linux-image-6.1.0-50-amd64"

# Modules the guest initramfs loads, in this order; their dependencies come from
# modules.dep and are loaded first.
GUEST_MODULES="virtio_mmio virtio_pci virtio_blk virtio_net"

# Modules `evmm run` needs in the guest (virtio-mmio, virtio-fs, overlayfs), packed for
# the stock kernel into out/modules-RELEASE.cpio, which `evmm run` appends to the
# initramfs it generates.
RUN_MODULES="virtio_mmio virtiofs overlay"

# Modules the nested test host (L1) loads: KVM on emulated AMD SVM, tun for tap devices,
# loop and device-mapper (its linear and error targets) for the failing disks of the
# fault tests.
L1_MODULES="kvm-amd tun vhost_net loop dm-mod"

# Host tools bundled into the L1 initramfs with their shared libraries. iproute2's ip
# (tap devices: `ip tuntap`) replaces busybox's /usr/bin/ip, but busybox's sh runs its
# own applet for a bare `ip`: scripts call /usr/bin/ip. iperf3 is the benchmark's peer.
# dmsetup builds the fault tests' failing disks (busybox has losetup, not dmsetup).
# virtiofsd (Debian's, from qemu-system-common) serves `evmm run`'s share.
L1_TOOLS="/usr/bin/qemu-system-x86_64 /usr/bin/qemu-storage-daemon /usr/bin/ip /usr/bin/iperf3 /usr/sbin/dmsetup /usr/lib/qemu/virtiofsd"

# Firmware directories the bundled QEMU reads (copied with symlinks resolved).
L1_DATA="/usr/share/qemu /usr/share/seabios"

# Debian tools bundled into the guest initramfs with their shared libraries
# (absolute paths on the build host). busybox covers ip, nc, sha256sum and udhcpc (its
# ping has no don't-fragment option: the network checks ping with evmm-guest-net);
# iperf3 is the network benchmark.
GUEST_TOOLS="/usr/bin/iperf3"

# Guest-side test programs built by this repository: cargo binaries built as static
# executables and installed into the guest's /usr/bin.
GUEST_RUST_BINS="evmm-guest-sysinfo evmm-guest-blk evmm-guest-net"

# Programs of this repository also installed into the nested test host's /usr/bin (the
# same static builds): evmm-guest-net is the peer of the guest's network checks there,
# so L1 does not depend on a release build having it. The release binaries on PATH
# (/payload/bin) come first when they have it.
L1_RUST_BINS="evmm-guest-net"
