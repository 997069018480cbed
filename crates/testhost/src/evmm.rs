//! Command lines that boot the guest images under evmm (the release binary, found on
//! PATH: the repository's `target/release` here, `/payload/bin` in the nested host).

use crate::images::GuestImages;

/// A Linux guest of `guest-images/build` under evmm.
#[derive(Debug, Clone)]
pub struct EvmmGuest {
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Kernel command line after the console settings (e.g. `evmm.test=sysinfo`).
    pub cmdline: String,
    /// Further evmm arguments.
    pub extra: Vec<String>,
}

impl EvmmGuest {
    /// A guest with 512 MiB and 1 vCPU running the guest test `test`.
    pub fn new(test: &str) -> Self {
        Self {
            memory_mib: 512,
            cpus: 1,
            cmdline: crate::guest::test_arg(test),
            extra: Vec::new(),
        }
    }

    /// The full command line, console on stdout.
    pub fn argv(&self, images: &GuestImages) -> Vec<String> {
        let mut argv = vec![
            "evmm".to_string(),
            "--kernel".into(),
            images.vmlinuz.display().to_string(),
            "--initramfs".into(),
            images.initramfs.display().to_string(),
            "--memory".into(),
            self.memory_mib.to_string(),
            "--cpus".into(),
            self.cpus.to_string(),
            "--cmdline".into(),
            format!("console=ttyS0 reboot=k panic=-1 quiet {}", self.cmdline),
        ];
        argv.extend(self.extra.iter().cloned());
        argv
    }
}
