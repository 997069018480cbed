//! A validated VM configuration.

pub mod disk;
pub mod fs;
pub mod net;
pub mod vhost_user;

use std::path::{Path, PathBuf};

use evmm_virtio::blk::BlockConfig;

use crate::arch::layout::MAX_VIRTIO_MMIO_DEVICES;
use net::NetSpec;
use vhost_user::VhostUserBlkConfig;

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
    /// A `--disk` value cannot be parsed.
    #[error("--disk {spec}: {source}")]
    Disk {
        /// The value as given.
        spec: String,
        /// What is wrong with it.
        source: disk::DiskOptionError,
    },
    /// A disk's file cannot be used.
    #[error("--disk {spec}: {source}")]
    DiskFile {
        /// The value as given.
        spec: String,
        /// What is wrong with the file.
        source: disk::DiskFileError,
    },
    /// More disks than there are device slots.
    #[error("{0} disks given; evmm supports at most {MAX_VIRTIO_MMIO_DEVICES} virtio devices")]
    TooManyDisks(usize),
    /// A `--vhost-user-blk` value cannot be parsed.
    #[error("--vhost-user-blk {spec}: {source}")]
    VhostUserBlk {
        /// The value as given.
        spec: String,
        /// What is wrong with it.
        source: vhost_user::VhostUserOptionError,
    },
    /// A `--net` value cannot be parsed.
    #[error("--net {spec}: {source}")]
    Net {
        /// The value as given.
        spec: String,
        /// What is wrong with it.
        source: net::NetOptionError,
    },
    /// A `--fs` value cannot be parsed.
    #[error("--fs {spec}: {source}")]
    Fs {
        /// The value as given.
        spec: String,
        /// What is wrong with it.
        source: fs::FsOptionError,
    },
    /// More `--disk`, `--vhost-user-blk`, `--net` and `--fs` devices together than
    /// there are slots.
    #[error(
        "{0} virtio devices given (--disk, --vhost-user-blk, --net and --fs together); \
         evmm supports at most {MAX_VIRTIO_MMIO_DEVICES}"
    )]
    TooManyDevices(usize),
    /// The directory of the metrics file does not exist.
    #[error("--metrics {0}: its directory does not exist")]
    MetricsDir(PathBuf),
}

/// How a guest's QueueNotify writes reach the device worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NotifyMode {
    /// KVM signals the queue's kick eventfd itself (KVM_IOEVENTFD): no exit
    /// to evmm.
    #[default]
    Ioeventfd,
    /// The write exits to the vCPU thread, which signals the kick eventfd.
    Exit,
}

impl NotifyMode {
    /// The name used on the command line and in the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyMode::Ioeventfd => "ioeventfd",
            NotifyMode::Exit => "exit",
        }
    }
}

/// The devices of a VM, already checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// virtio-blk disks, in `--disk` order (the first is `vda` in the guest).
    pub disks: Vec<BlockConfig>,
    /// vhost-user-blk devices, in `--vhost-user-blk` order; their slots follow the
    /// disks' (with two disks, the first vhost-user-blk device is `vdc`).
    pub vhost_user_blk: Vec<VhostUserBlkConfig>,
    /// virtio-net devices, in `--net` order, after the block devices.
    pub nets: Vec<NetSpec>,
    /// virtio-fs devices served by vhost-user backends, in `--fs` order, last.
    pub fs: Vec<fs::VhostUserFsConfig>,
    /// How queue notifications are delivered.
    pub notify: NotifyMode,
    /// Where to write the device counters at exit.
    pub metrics: Option<PathBuf>,
}

impl DeviceConfig {
    /// Parses the `--disk` values and checks their files and the metrics
    /// path, without opening or creating anything.
    pub fn new(
        disk_specs: &[String],
        notify: NotifyMode,
        metrics: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        if disk_specs.len() > MAX_VIRTIO_MMIO_DEVICES as usize {
            return Err(ConfigError::TooManyDisks(disk_specs.len()));
        }
        let disks = disk_specs
            .iter()
            .map(|spec| {
                let disk = disk::parse_disk(spec).map_err(|source| ConfigError::Disk {
                    spec: spec.clone(),
                    source,
                })?;
                disk::check_disk_file(&disk.path).map_err(|source| ConfigError::DiskFile {
                    spec: spec.clone(),
                    source,
                })?;
                Ok(disk)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(path) = &metrics {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            if dir.is_some_and(|d| !Path::is_dir(d)) {
                return Err(ConfigError::MetricsDir(path.clone()));
            }
        }
        Ok(DeviceConfig {
            disks,
            vhost_user_blk: Vec::new(),
            nets: Vec::new(),
            fs: Vec::new(),
            notify,
            metrics,
        })
    }

    /// The same devices plus the `--vhost-user-blk` values, parsed. Nothing is
    /// connected yet.
    pub fn with_vhost_user_blk(self, specs: &[String]) -> Result<Self, ConfigError> {
        self.check_room(specs.len())?;
        let vhost_user_blk = specs
            .iter()
            .map(|spec| {
                vhost_user::parse_vhost_user_blk(spec).map_err(|source| ConfigError::VhostUserBlk {
                    spec: spec.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeviceConfig {
            vhost_user_blk,
            ..self
        })
    }

    /// The same devices plus the `--net` values, parsed. No tap is opened yet.
    pub fn with_nets(self, specs: &[String]) -> Result<Self, ConfigError> {
        self.check_room(specs.len())?;
        let nets = specs
            .iter()
            .map(|spec| {
                net::parse_net(spec).map_err(|source| ConfigError::Net {
                    spec: spec.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeviceConfig { nets, ..self })
    }

    /// The same devices plus the `--fs` values, parsed. Nothing is connected yet.
    pub fn with_fs(self, specs: &[String]) -> Result<Self, ConfigError> {
        self.check_room(specs.len())?;
        let fs = specs
            .iter()
            .map(|spec| {
                fs::parse_fs(spec).map_err(|source| ConfigError::Fs {
                    spec: spec.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeviceConfig { fs, ..self })
    }

    /// The number of virtio devices.
    pub fn count(&self) -> usize {
        self.disks.len() + self.vhost_user_blk.len() + self.nets.len() + self.fs.len()
    }

    fn check_room(&self, more: usize) -> Result<(), ConfigError> {
        let total = self.count() + more;
        if total > MAX_VIRTIO_MMIO_DEVICES as usize {
            return Err(ConfigError::TooManyDevices(total));
        }
        Ok(())
    }
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
    /// Disks, notification mode, metrics file.
    pub devices: DeviceConfig,
    /// The threads' seccomp filters.
    pub seccomp: evmm_seccomp::Mode,
    /// The exit device on its I/O port (`--exit-device`).
    pub exit_device: bool,
    /// Standard input goes to the guest's console (the terminal in raw mode);
    /// `false` leaves standard input and the terminal alone (`evmm run`).
    pub console_input: bool,
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
            devices: DeviceConfig::default(),
            seccomp: evmm_seccomp::Mode::default(),
            exit_device: false,
            console_input: true,
        })
    }

    /// The same configuration with `devices`.
    pub fn with_devices(self, devices: DeviceConfig) -> Self {
        VmConfig { devices, ..self }
    }

    /// The same configuration with seccomp filters in `mode`.
    pub fn with_seccomp(self, seccomp: evmm_seccomp::Mode) -> Self {
        VmConfig { seccomp, ..self }
    }

    /// The same configuration with standard input forwarded to the console (`true`)
    /// or left alone.
    pub fn with_console_input(self, console_input: bool) -> Self {
        VmConfig {
            console_input,
            ..self
        }
    }

    /// The same configuration with the exit device on (`true`) or off.
    pub fn with_exit_device(self, exit_device: bool) -> Self {
        VmConfig {
            exit_device,
            ..self
        }
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
    fn devices_default_to_none_with_ioeventfd() {
        let c = cfg(512, 1).unwrap();
        assert!(c.devices.disks.is_empty());
        assert!(c.devices.vhost_user_blk.is_empty());
        assert_eq!(c.devices.notify, NotifyMode::Ioeventfd);
        assert_eq!(c.devices.metrics, None);
        assert_eq!(NotifyMode::Exit.as_str(), "exit");
        assert_eq!(NotifyMode::Ioeventfd.as_str(), "ioeventfd");
    }

    #[test]
    fn device_config_checks_disks_and_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let spec = format!("path={},readonly=on", img.display());
        let metrics = dir.path().join("m.json");
        let d = DeviceConfig::new(
            &[spec.clone(), format!("path={}", img.display())],
            NotifyMode::Exit,
            Some(metrics.clone()),
        )
        .unwrap();
        assert_eq!(d.disks.len(), 2);
        assert!(d.disks[0].readonly && !d.disks[1].readonly);
        assert_eq!(d.metrics, Some(metrics));
        assert!(!dir.path().join("m.json").exists(), "nothing is created");
        // A relative metrics path is in the current directory.
        assert!(DeviceConfig::new(&[], NotifyMode::Exit, Some("m.json".into())).is_ok());

        let err = DeviceConfig::new(&["path=/a,x=1".into()], NotifyMode::Exit, None).unwrap_err();
        assert!(matches!(err, ConfigError::Disk { .. }));
        assert_eq!(
            err.to_string(),
            "--disk path=/a,x=1: unknown key 'x' (known: path, readonly, id, queues, direct, engine, poll, poll_us)"
        );
        let missing = format!("path={}", dir.path().join("nope.img").display());
        let err = DeviceConfig::new(&[missing], NotifyMode::Exit, None).unwrap_err();
        assert!(matches!(err, ConfigError::DiskFile { .. }));
        assert!(err.to_string().contains("nope.img"), "{err}");
        let err = DeviceConfig::new(
            &[],
            NotifyMode::Ioeventfd,
            Some(dir.path().join("no/such/dir/m.json")),
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::MetricsDir(_)));
        let many = vec![spec.clone(); MAX_VIRTIO_MMIO_DEVICES as usize + 1];
        assert_eq!(
            DeviceConfig::new(&many, NotifyMode::Ioeventfd, None),
            Err(ConfigError::TooManyDisks(many.len()))
        );

        // vhost-user-blk devices share the slots with the disks.
        let disks = DeviceConfig::new(&[spec.clone(), spec], NotifyMode::Exit, None).unwrap();
        let vu = vec!["socket=/s".to_string(); MAX_VIRTIO_MMIO_DEVICES as usize - 2];
        let d = disks.clone().with_vhost_user_blk(&vu).unwrap();
        assert_eq!(d.vhost_user_blk.len(), vu.len());
        assert_eq!(d.disks.len(), 2);
        let mut too_many = vu.clone();
        too_many.push("socket=/t".into());
        let err = disks.clone().with_vhost_user_blk(&too_many).unwrap_err();
        assert_eq!(err, ConfigError::TooManyDevices(too_many.len() + 2));
        assert!(
            err.to_string()
                .contains(&format!("evmm supports at most {MAX_VIRTIO_MMIO_DEVICES}")),
            "{err}"
        );
        // --net devices count too.
        let err = d.with_nets(&["tap=t".into()]).unwrap_err();
        assert_eq!(
            err,
            ConfigError::TooManyDevices(MAX_VIRTIO_MMIO_DEVICES as usize + 1)
        );
        let err = disks
            .with_vhost_user_blk(&["socket=/s,queues=0".into()])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--vhost-user-blk socket=/s,queues=0: queues=0: expected a number from 1 to 16"
        );
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_bytes() > 64 << 20);
    }
}
