//! A validated VM configuration.

use std::path::PathBuf;

/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Default guest RAM in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u32 = 1;
/// Smallest guest RAM evmm accepts, in MiB (the boot area alone needs 1 MiB).
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most vCPUs evmm supports: APIC ids are 8 bits in the MADT and MP table
/// and 255 is the broadcast id; one more id goes to the IOAPIC.
pub const MAX_VCPUS: u32 = 254;

const MIB: u64 = 1 << 20;

/// Invalid configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Too little memory.
    #[error("--memory {0} MiB is too small: the guest needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    /// More memory than the host has.
    #[error("--memory {requested} MiB is more than the host's physical memory ({host} MiB)")]
    MemoryTooLarge {
        /// Requested MiB.
        requested: u64,
        /// Host physical memory in MiB.
        host: u64,
    },
    /// No vCPU.
    #[error("--cpus must be at least 1")]
    NoVcpus,
    /// Too many vCPUs.
    #[error("--cpus {0} is more than evmm supports ({MAX_VCPUS})")]
    TooManyVcpus(u32),
    /// The command line contains a NUL byte.
    #[error("--cmdline must not contain a NUL byte")]
    CmdlineNul,
}

/// Everything needed to build and boot a VM, already checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Optional initramfs path.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
}

impl VmConfig {
    /// Validates the values against evmm's limits and the host's memory.
    pub fn new(
        kernel: PathBuf,
        initramfs: Option<PathBuf>,
        cmdline: String,
        memory_mib: u64,
        vcpus: u32,
    ) -> Result<Self, ConfigError> {
        Self::with_host_memory(
            kernel,
            initramfs,
            cmdline,
            memory_mib,
            vcpus,
            host_memory_bytes(),
        )
    }

    fn with_host_memory(
        kernel: PathBuf,
        initramfs: Option<PathBuf>,
        cmdline: String,
        memory_mib: u64,
        vcpus: u32,
        host_bytes: u64,
    ) -> Result<Self, ConfigError> {
        if memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(memory_mib));
        }
        let host_mib = host_bytes / MIB;
        if memory_mib > host_mib {
            return Err(ConfigError::MemoryTooLarge {
                requested: memory_mib,
                host: host_mib,
            });
        }
        if vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus(vcpus));
        }
        if cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        Ok(VmConfig {
            kernel,
            initramfs,
            cmdline,
            memory_bytes: memory_mib * MIB,
            vcpus: vcpus as u8,
        })
    }
}

/// The host's physical memory in bytes (`_SC_PHYS_PAGES * _SC_PAGESIZE`).
pub fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf only reads system configuration values.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if pages <= 0 || page_size <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(page_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 8 << 30;

    fn cfg(mem: u64, cpus: u32) -> Result<VmConfig, ConfigError> {
        VmConfig::with_host_memory("/k".into(), None, DEFAULT_CMDLINE.into(), mem, cpus, HOST)
    }

    #[test]
    fn accepts_sane_values() {
        let c = cfg(512, 2).unwrap();
        assert_eq!(c.memory_bytes, 512 << 20);
        assert_eq!(c.vcpus, 2);
        assert!(cfg(8192, 254).is_ok());
    }

    #[test]
    fn rejects_bad_memory() {
        assert_eq!(cfg(0, 1), Err(ConfigError::MemoryTooSmall(0)));
        assert_eq!(cfg(15, 1), Err(ConfigError::MemoryTooSmall(15)));
        assert_eq!(
            cfg(8193, 1),
            Err(ConfigError::MemoryTooLarge {
                requested: 8193,
                host: 8192
            })
        );
        assert!(cfg(0, 1)
            .unwrap_err()
            .to_string()
            .contains("--memory 0 MiB"));
    }

    #[test]
    fn rejects_bad_cpus() {
        assert_eq!(cfg(512, 0), Err(ConfigError::NoVcpus));
        assert_eq!(cfg(512, 255), Err(ConfigError::TooManyVcpus(255)));
    }

    #[test]
    fn rejects_nul_in_cmdline() {
        let r = VmConfig::with_host_memory("/k".into(), None, "a\0b".into(), 512, 1, HOST);
        assert_eq!(r, Err(ConfigError::CmdlineNul));
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_bytes() > 64 << 20);
    }
}
