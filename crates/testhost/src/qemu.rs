//! Command lines that boot the guest images under QEMU, the reference VMM the tests and
//! benchmarks compare evmm with.

use crate::images::GuestImages;

/// Arguments every QEMU guest of the tests and benches takes: no default devices or
/// config, no display, exit instead of reboot, console on stdio.
const COMMON: &[&str] = &[
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-reboot",
    "-serial",
    "stdio",
];

/// QEMU on KVM through `evmm-qemu`, which adds the `-cpu` model that QEMU starts with
/// on the KVM where the command runs (this host or the nested host; see
/// [`crate::qemu_cpu`]), followed by [`COMMON`] and `extra`.
pub fn kvm_base_argv(extra: &[&str]) -> Vec<String> {
    ["evmm-qemu"]
        .into_iter()
        .chain(COMMON.iter().copied())
        .chain(extra.iter().copied())
        .map(str::to_string)
        .collect()
}

/// `qemu-system-x86_64` for a guest under TCG (the emulator: every feature it has),
/// followed by [`COMMON`] and `extra`.
pub fn tcg_base_argv(extra: &[&str]) -> Vec<String> {
    argv_with_cpu("max", extra)
}

/// `qemu-system-x86_64 -cpu cpu`, followed by [`COMMON`] and `extra`.
fn argv_with_cpu(cpu: &str, extra: &[&str]) -> Vec<String> {
    ["qemu-system-x86_64", "-cpu", cpu]
        .into_iter()
        .chain(COMMON.iter().copied())
        .chain(extra.iter().copied())
        .map(str::to_string)
        .collect()
}

/// A Linux guest of `guest-images/build` under QEMU with KVM.
#[derive(Debug, Clone)]
pub struct QemuGuest {
    /// The QEMU machine type (`microvm` or `pc`).
    pub machine: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Kernel command line after the console settings (e.g. `evmm.test=sysinfo`).
    pub cmdline: String,
    /// Further QEMU arguments (devices).
    pub extra: Vec<String>,
    /// A `-cpu` model to force (`$EVMM_QEMU_CPU` for `evmm-qemu`); `None`: the model
    /// `evmm-qemu` finds QEMU starts with where the command runs.
    pub cpu: Option<String>,
}

impl QemuGuest {
    /// A `-M microvm` guest running the guest test `test`.
    pub fn microvm(test: &str) -> Self {
        Self {
            machine: "microvm".into(),
            memory_mib: 512,
            cpus: 1,
            cmdline: crate::guest::test_arg(test),
            extra: Vec::new(),
            cpu: None,
        }
    }

    /// The full command line, console on stdout, exiting when the guest reboots. It
    /// starts with `evmm-qemu` (a release binary of this repository, on PATH wherever
    /// [`crate::Route`] runs a command).
    pub fn argv(&self, images: &GuestImages) -> Vec<String> {
        let mut argv: Vec<String> = match &self.cpu {
            Some(model) => vec!["env".into(), format!("{}={model}", crate::qemu_cpu::ENV)],
            None => Vec::new(),
        };
        argv.extend(kvm_base_argv(&["-L", "/usr/share/qemu"]));
        argv.extend([
            "-M".into(),
            format!("{},accel=kvm", self.machine),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-kernel".into(),
            images.vmlinuz.display().to_string(),
            "-initrd".into(),
            images.initramfs.display().to_string(),
            "-append".into(),
            format!("console=ttyS0 reboot=t panic=-1 quiet {}", self.cmdline),
        ]);
        argv.extend(self.extra.iter().cloned());
        argv
    }
}

/// QEMU `-M microvm` running the notify guest (a PVH ELF) on a
/// virtio-blk disk whose GET_ID answer is `id`. QEMU 7.2's virtio-mmio is legacy unless
/// told otherwise, and a PVH kernel gets no `virtio_mmio.device=` from it: a single
/// device sits in microvm's last transport, 0xfeb02e00, on GSI 47. `cpu` is the `-cpu`
/// model (see [`crate::qemu_cpu::kvm_cpu_model`]).
pub fn notify_guest_microvm_argv(
    cpu: &str,
    guest: &str,
    disk: &str,
    id: &str,
    requests: u32,
    memory_mib: u32,
) -> Vec<String> {
    let mut argv = argv_with_cpu(
        cpu,
        &[
            "-M",
            "microvm,accel=kvm",
            "-global",
            "virtio-mmio.force-legacy=false",
        ],
    );
    argv.extend([
        "-m".into(),
        memory_mib.to_string(),
        "-kernel".into(),
        guest.to_string(),
        "-append".into(),
        format!("virtio_mmio.device=512@0xfeb02e00:47 notify.requests={requests}"),
        "-drive".into(),
        format!("id=d,file={disk},format=raw,if=none"),
        "-device".into(),
        format!("virtio-blk-device,drive=d,serial={id}"),
    ]);
    argv
}

/// QEMU microvm (through `evmm-qemu`) running the notify guest in its net mode on a
/// `virtio-net-device` attached to the existing tap `tap`, with the kernel's vhost-net
/// data path when `vhost` (QEMU opens `/dev/vhost-net`). A lone virtio-mmio device is
/// microvm's transport 23 (0xfeb02e00, GSI 47); QEMU gives a PVH kernel no
/// `virtio_mmio.device=`, so it is on the command line.
pub fn notify_guest_microvm_net_argv(
    guest: &str,
    tap: &str,
    vhost: bool,
    requests: u32,
    memory_mib: u32,
) -> Vec<String> {
    let mut argv = kvm_base_argv(&[
        "-M",
        "microvm,accel=kvm",
        "-global",
        "virtio-mmio.force-legacy=false",
    ]);
    argv.extend([
        "-m".into(),
        memory_mib.to_string(),
        "-kernel".into(),
        guest.to_string(),
        "-append".into(),
        format!("virtio_mmio.device=512@0xfeb02e00:47 notify.net=1 notify.requests={requests}"),
        "-netdev".into(),
        format!(
            "tap,id=n,ifname={tap},script=no,downscript=no,vhost={}",
            if vhost { "on" } else { "off" }
        ),
        "-device".into(),
        "virtio-net-device,netdev=n".into(),
    ]);
    argv
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn microvm_command_line() {
        let images = GuestImages {
            dir: "/o".into(),
            vmlinuz: "/o/vmlinuz".into(),
            initramfs: "/o/initramfs.cpio.gz".into(),
            l1_initramfs: PathBuf::from("/o/l1.cpio"),
        };
        let mut g = QemuGuest::microvm("sysinfo");
        g.cpus = 2;
        let argv = g.argv(&images).join(" ");
        assert!(argv.starts_with("evmm-qemu "));
        assert!(argv.contains("-M microvm,accel=kvm -m 512 -smp 2"));
        assert!(argv.contains("-kernel /o/vmlinuz -initrd /o/initramfs.cpio.gz"));
        assert!(argv.ends_with("quiet evmm.test=sysinfo"));
        g.cpu = Some("host,-arch-capabilities".into());
        let argv = g.argv(&images).join(" ");
        assert!(
            argv.starts_with("env EVMM_QEMU_CPU=host,-arch-capabilities evmm-qemu "),
            "{argv}"
        );
    }
}
