//! Command line of the `evmm` binary.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{VmConfig, DEFAULT_CMDLINE, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS};

const AFTER_HELP: &str = "\
The guest's serial console (COM1, ttyS0) is connected to standard input and
output; when standard input is a terminal it is put in raw mode for the life of
the VM.

Exit status:
  0  the guest powered off or rebooted (reboot ends the VM), or evmm received
     SIGTERM, SIGINT or SIGHUP and stopped the VM
  1  evmm failed: bad configuration, unusable kernel or initramfs, KVM error
  2  the command line could not be parsed

Example:
  evmm --kernel vmlinuz --initramfs initrd.gz --memory 1024 --cpus 2 \\
       --cmdline \"console=ttyS0 reboot=k panic=1\"";

/// Launch an evmm virtual machine.
///
/// evmm boots a Linux kernel (bzImage, or ELF vmlinux through its PVH entry
/// point) in a KVM virtual machine with a serial console, ACPI, an in-kernel
/// interrupt controller and N vCPUs.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(name = "evmm", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Path to the kernel image: a bzImage, or an ELF vmlinux (booted through
    /// its PVH entry point when it has one)
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Path to an initramfs (cpio archive, compressed or not)
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest RAM size in MiB
    #[arg(long, value_name = "MiB", default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory: u64,

    /// Number of vCPUs
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VCPUS)]
    pub cpus: u32,

    /// Log level for evmm's own diagnostics on standard error: off, error,
    /// warn, info, debug or trace [default: RUST_LOG, else warn]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}

impl Cli {
    /// Checks the values and turns them into a [`VmConfig`].
    pub fn to_config(&self) -> Result<VmConfig, crate::config::ConfigError> {
        VmConfig::new(
            self.kernel.clone(),
            self.initramfs.clone(),
            self.cmdline.clone(),
            self.memory,
            self.cpus,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["evmm", "--kernel", "/k"]).unwrap();
        assert_eq!(cli.kernel, PathBuf::from("/k"));
        assert_eq!(cli.initramfs, None);
        assert_eq!(cli.cmdline, "console=ttyS0 reboot=k panic=1");
        assert_eq!(cli.memory, 512);
        assert_eq!(cli.cpus, 1);
        assert_eq!(cli.log_level, None);
    }

    #[test]
    fn all_options() {
        let cli = Cli::try_parse_from([
            "evmm",
            "--kernel",
            "/k",
            "--initramfs",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--memory",
            "1024",
            "--cpus",
            "4",
            "--log-level",
            "debug",
        ])
        .unwrap();
        assert_eq!(cli.initramfs, Some(PathBuf::from("/i")));
        assert_eq!(cli.cmdline, "console=ttyS0 quiet");
        assert_eq!(cli.memory, 1024);
        assert_eq!(cli.cpus, 4);
        assert_eq!(cli.log_level, Some(log::LevelFilter::Debug));
    }

    #[test]
    fn kernel_is_required_and_unknown_flags_fail() {
        assert!(Cli::try_parse_from(["evmm"]).is_err());
        let err = Cli::try_parse_from(["evmm", "--kernel", "/k", "--frobnicate"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        assert!(Cli::try_parse_from(["evmm", "--kernel", "/k", "--cpus", "x"]).is_err());
        assert!(Cli::try_parse_from(["evmm", "--kernel", "/k", "--memory", "-1"]).is_err());
    }

    #[test]
    fn help_mentions_every_option() {
        let help = Cli::command().render_long_help().to_string();
        for opt in [
            "--kernel",
            "--initramfs",
            "--cmdline",
            "--memory",
            "--cpus",
            "--log-level",
        ] {
            assert!(help.contains(opt), "{opt} missing from help");
        }
        assert!(help.contains("Exit status"));
    }
}
