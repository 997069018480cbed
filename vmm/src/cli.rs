//! Command line of the `evmm` binary.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{
    ConfigError, DeviceConfig, NotifyMode, VmConfig, DEFAULT_CMDLINE, DEFAULT_MEMORY_MIB,
    DEFAULT_VCPUS,
};

const AFTER_HELP: &str = "\
The guest's serial console (COM1, ttyS0) is connected to standard input and
output; when standard input is a terminal it is put in raw mode for the life of
the VM.

Disks are virtio-blk devices on virtio-mmio, announced to the guest in the
ACPI DSDT (LNRO0005) and with virtio_mmio.device= on the kernel command line;
the first --disk is /dev/vda. --vhost-user-blk devices come after the
disks, --net devices (virtio-net on a tap, eth0 for the first) after those,
--fs devices (virtio-fs, served by a vhost-user backend such as virtiofsd) last; the
--vhost-user-blk devices' requests are served by another process (e.g.
qemu-storage-daemon --export type=vhost-user-blk) that evmm connects to at
start-up and hands the guest memory, the queues' kick eventfds and the
device's irqfd. If that backend dies, evmm logs it and answers the device's
requests with I/O errors. With --metrics, evmm writes the per-queue
counters of every device as JSON when the VM stops (guest power-off or reboot,
a stop signal, or a vCPU error).

`evmm run [OPTIONS] -- COMMAND...` boots a kernel with the host's files as its
root (virtio-fs, virtiofsd) and exits with COMMAND's status: see `evmm run --help`.

Exit status:
  0  the guest powered off or rebooted (reboot ends the VM), or evmm received
     SIGTERM, SIGINT or SIGHUP and stopped the VM
  N  with --exit-device: the guest wrote N to I/O port 0xf4
  1  evmm failed: bad configuration (including a bad --disk value or a missing
     disk file, or a vhost-user backend that cannot be reached), unusable
     kernel or initramfs, KVM error
  2  the command line could not be parsed

Example:
  evmm --kernel vmlinuz --initramfs initrd.gz --memory 1024 --cpus 2 \\
       --cmdline \"console=ttyS0 reboot=k panic=1\" \\
       --disk path=root.img --disk path=data.img,readonly=on,id=data0 \\
       --metrics /tmp/evmm-metrics.json";

/// Launch an evmm virtual machine.
///
/// evmm boots a Linux kernel (bzImage, or ELF vmlinux through its PVH entry
/// point) in a KVM virtual machine with a serial console, ACPI, an in-kernel
/// interrupt controller, N vCPUs and virtio-blk disks whose queues are
/// driven by ioeventfds and irqfds.
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

    /// Disk parameters "path=<disk_image_path>,readonly=on|off,id=<serial>,queues=<number_of_queues>,direct=on|off,engine=io_uring|sync|auto,poll=off|adaptive|<microseconds>".
    /// path is a raw image file or block device; readonly=on offers a
    /// read-only disk (writes fail in the guest) [default: off]; id is what
    /// the guest reads as the disk's serial, at most 20 bytes; queues is 1
    /// to 16 [default: 1]; direct=on opens the file with O_DIRECT (not on
    /// tmpfs) [default: off]; engine executes the requests: io_uring (many in
    /// flight per queue), sync (one at a time), auto (io_uring where the host
    /// allows it, else sync with a warning) [default: auto]; poll is how the
    /// disk's worker waits for requests: off (sleep on the kicks), a fixed
    /// window of 1 to 1000 µs or adaptive (up to 64 µs), polling the rings with
    /// the guest's kicks turned off [default: adaptive]; poll_us=N is poll=N.
    /// Repeat the option for more disks
    #[arg(long, value_name = "DISK")]
    pub disk: Vec<String>,

    /// A virtio-blk device served by a vhost-user backend:
    /// "socket=<unix_socket_path>,queues=<number_of_queues>". socket is where
    /// the backend listens (evmm connects at start-up and fails if nothing
    /// answers); queues is 1 to 16 and at most what the backend supports
    /// [default: the backend's num_queues, else 1]. Repeat the option for
    /// more devices; they follow the --disk devices
    #[arg(long, value_name = "VHOST_USER_BLK")]
    pub vhost_user_blk: Vec<String>,

    /// A virtio-net device on a Linux tap:
    /// "tap=<name>|fd=<n>[:<n>...],mac=<52:54:00:xx:xx:xx>,queues=<pairs>,mtu=<bytes>,poll_us=<microseconds>,vhost=on|off".
    /// tap is the tap's name (opened, or created with CAP_NET_ADMIN); fd takes taps
    /// the caller opened (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), one per queue pair; mac
    /// [default: 52:54:00 and three bytes of evmm's pid and the device's slot];
    /// queues is the number of queue pairs, 1 to 8 (more than 1 needs a multi_queue
    /// tap) [default: 1]; mtu is offered to the guest, 68 to 65521 [default: none,
    /// Linux takes 1500]; poll_us is how long the worker keeps checking its
    /// eventfds before it sleeps, 0 to 1000 [default: 0]; vhost=on hands the queues to the
    /// kernel's vhost-net (/dev/vhost-net), whose worker then moves the frames
    /// [default: off]. Repeat the option for more devices; they follow the block
    /// devices
    #[arg(long, value_name = "NET")]
    pub net: Vec<String>,

    /// A virtio-fs device served by a vhost-user backend (virtiofsd):
    /// "tag=<tag>,socket=<unix_socket_path>,queues=<request_queues>". tag is what
    /// the guest mounts (mount -t virtiofs TAG DIR), 1 to 36 bytes; socket is where
    /// the backend listens (evmm connects at start-up and fails if nothing answers);
    /// queues is the number of request queues, 1 to 8 [default: 1]. Repeat the
    /// option for more devices; they follow the --net devices
    #[arg(long, value_name = "FS")]
    pub fs: Vec<String>,

    /// How the guest's queue notifications reach the device workers:
    /// ioeventfd lets KVM signal the worker without leaving the guest; exit
    /// makes each notification exit to the vCPU thread, which signals it
    #[arg(long, value_enum, value_name = "MODE", default_value_t = NotifyMode::Ioeventfd)]
    pub notify: NotifyMode,

    /// Write the devices' counters (kicks, wake-ups, requests, interrupts,
    /// QueueNotify exits) as JSON to this file when the VM stops
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,

    /// Seccomp filters on evmm's threads, one per kind of thread (vCPU, device
    /// worker, main...): kill ends evmm when a thread makes a syscall its filter
    /// does not allow, naming the thread and the syscall; log lets the syscall run
    /// and has the kernel log it; off installs none
    #[arg(long, value_name = "MODE", default_value = "kill")]
    pub seccomp: evmm_seccomp::Mode,

    /// The exit device: a guest write of byte N to I/O port 0xf4 stops the VM and
    /// evmm exits with status N (from a Linux guest:
    /// `printf '\\007' | dd of=/dev/port bs=1 seek=244 count=1` exits with 7)
    #[arg(long)]
    pub exit_device: bool,

    /// Log level for evmm's own diagnostics on standard error: off, error,
    /// warn, info, debug or trace [default: RUST_LOG, else warn]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}

impl Cli {
    /// Checks the values and turns them into a [`VmConfig`].
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let config = VmConfig::new(
            self.kernel.clone(),
            self.initramfs.clone(),
            self.cmdline.clone(),
            self.memory,
            self.cpus,
        )?;
        let devices = DeviceConfig::new(&self.disk, self.notify, self.metrics.clone())?
            .with_vhost_user_blk(&self.vhost_user_blk)?
            .with_nets(&self.net)?
            .with_fs(&self.fs)?;
        Ok(config
            .with_devices(devices)
            .with_seccomp(self.seccomp)
            .with_exit_device(self.exit_device))
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
        assert!(cli.disk.is_empty());
        assert!(cli.vhost_user_blk.is_empty());
        assert_eq!(cli.notify, NotifyMode::Ioeventfd);
        assert_eq!(cli.metrics, None);
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
            "--disk",
            "path=/a.img",
            "--disk",
            "path=/b.img,readonly=on,id=b,queues=2,direct=on",
            "--notify",
            "exit",
            "--metrics",
            "/tmp/m.json",
        ])
        .unwrap();
        assert_eq!(
            cli.disk,
            [
                "path=/a.img",
                "path=/b.img,readonly=on,id=b,queues=2,direct=on"
            ]
        );
        assert_eq!(cli.notify, NotifyMode::Exit);
        assert_eq!(cli.metrics, Some(PathBuf::from("/tmp/m.json")));
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
        let err = Cli::try_parse_from(["evmm", "--kernel", "/k", "--notify", "poll"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn disks_become_block_configs() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, [0u8; 4096]).unwrap();
        let cli = Cli::try_parse_from([
            "evmm".to_string(),
            "--kernel".into(),
            "/k".into(),
            "--disk".into(),
            format!("path={}", a.display()),
            "--disk".into(),
            format!("path={},readonly=on,id=ro-disk,queues=4", a.display()),
            "--notify".into(),
            "exit".into(),
        ])
        .unwrap();
        let config = cli.to_config().unwrap();
        let disks = &config.devices.disks;
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].path, a);
        assert!(!disks[0].readonly);
        assert_eq!(disks[0].queues, 1);
        assert!(disks[1].readonly);
        assert_eq!(disks[1].id.as_deref(), Some("ro-disk"));
        assert_eq!(disks[1].queues, 4);
        assert_eq!(config.devices.notify, NotifyMode::Exit);
    }

    #[test]
    fn bad_disks_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, [0u8; 4096]).unwrap();
        let to_config = |disk: String| {
            Cli::try_parse_from([
                "evmm".to_string(),
                "--kernel".into(),
                "/k".into(),
                "--disk".into(),
                disk,
            ])
            .unwrap()
            .to_config()
        };
        let p = a.display();
        for bad in [
            format!("path={p},color=red"),
            "readonly=on".to_string(),
            format!("path={p},queues=0"),
            format!("path={p},queues=17"),
            format!("path={p},queues=two"),
            format!("path={p},id=123456789012345678901"),
            format!("path={p},readonly=maybe"),
            format!("path={}", dir.path().join("missing.img").display()),
            format!("path={}", dir.path().display()),
        ] {
            let err = to_config(bad.clone()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with(&format!("--disk {bad}: ")), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
        assert!(to_config(format!("path={p},id=12345678901234567890")).is_ok());
    }

    fn vhost_user_config(specs: &[&str]) -> Result<VmConfig, ConfigError> {
        let mut args = vec!["evmm", "--kernel", "/k"];
        for s in specs {
            args.extend(["--vhost-user-blk", s]);
        }
        Cli::try_parse_from(args).unwrap().to_config()
    }

    #[test]
    fn vhost_user_blk_devices_are_parsed_in_order() {
        use crate::config::vhost_user::VhostUserBlkConfig;
        let config =
            vhost_user_config(&["socket=/run/a.sock", "socket=/run/b.sock,queues=2"]).unwrap();
        assert_eq!(
            config.devices.vhost_user_blk,
            [
                VhostUserBlkConfig {
                    socket: "/run/a.sock".into(),
                    queues: None
                },
                VhostUserBlkConfig {
                    socket: "/run/b.sock".into(),
                    queues: Some(2)
                }
            ]
        );
        assert!(config.devices.disks.is_empty());
        // Nothing is checked or connected at parse time: a missing socket is
        // reported when evmm connects.
        assert!(vhost_user_config(&["socket=/nonexistent"]).is_ok());
        // The option takes a value.
        let err = Cli::try_parse_from(["evmm", "--kernel", "/k", "--vhost-user-blk"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn bad_vhost_user_blk_values_are_config_errors() {
        for (bad, why) in [
            ("", "'' is not key=value"),
            ("/tmp/vu.sock", "'/tmp/vu.sock' is not key=value"),
            ("socket=", "socket is empty"),
            ("queues=2", "socket=PATH is missing"),
            (
                "socket=/s,queues=0",
                "queues=0: expected a number from 1 to 16",
            ),
            (
                "socket=/s,queues=17",
                "queues=17: expected a number from 1 to 16",
            ),
            ("socket=/s,queues=many", "queues=many: expected"),
            ("socket=/s,socket=/t", "'socket' given twice"),
            (
                "socket=/s,path=/a.img",
                "unknown key 'path' (known: socket, queues)",
            ),
        ] {
            let err = vhost_user_config(&[bad]).unwrap_err();
            assert!(matches!(err, ConfigError::VhostUserBlk { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("--vhost-user-blk {bad}: ")),
                "{msg}"
            );
            assert!(msg.contains(why), "{why:?} not in {msg:?}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
        let many = vec!["socket=/s"; crate::arch::layout::MAX_VIRTIO_MMIO_DEVICES as usize + 1];
        assert!(matches!(
            vhost_user_config(&many),
            Err(ConfigError::TooManyDevices(_))
        ));
    }

    #[test]
    fn bad_nets_are_config_errors() {
        for (bad, why) in [
            ("tap=t,queues=0", "queue pairs, 1 to 8"),
            ("tap=t,mac=zz:00:00:00:00:00", "unicast MAC"),
            ("mac=52:54:00:00:00:01", "tap=NAME or as fd=N"),
        ] {
            let cli = Cli::try_parse_from(["evmm", "--kernel", "/k", "--net", bad]).unwrap();
            let msg = cli.to_config().unwrap_err().to_string();
            assert!(msg.starts_with(&format!("--net {bad}: ")), "{msg}");
            assert!(msg.contains(why), "{why:?} not in {msg:?}");
        }
        let cli =
            Cli::try_parse_from(["evmm", "--kernel", "/k", "--net", "tap=t0", "--net", "fd=5"])
                .unwrap();
        assert_eq!(cli.to_config().unwrap().devices.nets.len(), 2);
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
            "--disk",
            "readonly=on|off",
            "--notify",
            "ioeventfd",
            "--metrics",
            "--vhost-user-blk",
            "socket=<unix_socket_path>",
            "--net",
            "tap=<name>|fd=<n>",
        ] {
            assert!(help.contains(opt), "{opt} missing from help");
        }
        assert!(help.contains("Exit status"));
    }
}
