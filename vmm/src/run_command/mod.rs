//! `evmm run`: boot a kernel with the host's files as its root and run one command in
//! it; evmm's exit status is the command's.
//!
//! virtiofsd ([`virtiofsd`]) shares a host directory (default `/`, read-only) on a
//! private socket; the VM gets it as a virtio-fs device (tag `evmm-root`) on the
//! vhost-user frontend, an initramfs of its own ([`initramfs`]: busybox, an init, the
//! kernel's modules from [`modules`]) and the exit device, through which the init
//! reports the command's status. The VM runs in this process; virtiofsd is stopped
//! and its socket removed on every way out (Ctrl-C and SIGTERM stop the VM first).
//! Where /dev/kvm cannot boot Linux (guest ring 0 emulated), it says so and ends.

pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod virtiofsd;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use crate::config::{DeviceConfig, NotifyMode, VmConfig};
use crate::vstate::exit::ExitReason;
use initramfs::GuestCommand;

/// The virtio-fs tag of the share, which the init mounts.
pub const TAG: &str = "evmm-root";

/// The guest kernel's command line: the console on COM1, quiet, a panic ends the VM.
const CMDLINE: &str = "console=ttyS0 quiet loglevel=1 panic=-1 reboot=k";

const AFTER_HELP: &str = "\
The guest's root is the shared directory: read-only with a tmpfs overlay (writes
stay in the guest) unless DIR is given without :ro, in which case the guest writes
into DIR. The command runs in the current directory (the same path in the guest,
else /), with standard input from /dev/null; its output and the guest's console
come on standard output. Needs root (virtiofsd) and a KVM that runs guest ring 0
natively (evmm-kvm-probe tells).

Exit status: the command's; 1 when evmm run itself fails (it prints one error:
line), 128+N when stopped by signal N.

Example:
  evmm run -- sh -c 'uname -r; cat /etc/os-release'
  evmm run --kernel arch/x86/boot/bzImage --share /srv/root -- ./test.sh";

/// Boot a kernel with the host's files as its root, run COMMAND, exit with its status.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(name = "evmm run", version, after_help = AFTER_HELP)]
pub struct RunCli {
    /// The kernel (bzImage) [default: the stock kernel of guest-images/build, from
    /// $EVMM_GUEST_IMAGES or the repository evmm was built in]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// The directory shared as the guest's root, read-only with ":ro" [default: /:ro]
    #[arg(long, value_name = "DIR[:ro]")]
    pub share: Option<String>,

    /// Guest RAM in MiB
    #[arg(long, value_name = "MiB", default_value_t = 512)]
    pub memory: u64,

    /// Number of vCPUs
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,

    /// The virtiofsd to run [default: $EVMM_VIRTIOFSD, /usr/lib/qemu/virtiofsd,
    /// /usr/libexec/virtiofsd, virtiofsd on PATH]
    #[arg(long, value_name = "PATH")]
    pub virtiofsd: Option<PathBuf>,

    /// Write the initramfs evmm run would boot to PATH and exit (to boot the same
    /// guest under another VMM: it mounts the virtio-fs tag evmm-root and reports the
    /// command's status as one byte at I/O port 0xf4)
    #[arg(long, value_name = "PATH")]
    pub write_initramfs: Option<PathBuf>,

    /// Log level for evmm's own diagnostics on standard error [default: RUST_LOG,
    /// else warn]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,

    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Errors of `evmm run` before the guest's command runs.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `--share` names no directory.
    #[error("--share {0}: no such directory")]
    NoShare(PathBuf),
    /// No kernel.
    #[error(
        "no kernel: give --kernel PATH (a bzImage), or build the stock one with guest-images/build"
    )]
    NoKernel,
    /// The kernel file is not there.
    #[error("--kernel {0}: no such file")]
    KernelMissing(PathBuf),
    /// The kernel cannot be read.
    #[error("--kernel {path}: {source}")]
    Kernel {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not root.
    #[error(
        "evmm run needs root: virtiofsd and the read-only bind of the share need CAP_SYS_ADMIN"
    )]
    NotRoot,
    /// This KVM cannot boot Linux.
    #[error(
        "this host's /dev/kvm cannot boot Linux: {0}; see evmm-kvm-probe \
         (in this repository's nested test host it can: guest-images/nested -- evmm run ...)"
    )]
    NoLinuxKvm(String),
    /// The modules.
    #[error(transparent)]
    Modules(#[from] modules::ModuleError),
    /// The initramfs.
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    /// virtiofsd.
    #[error(transparent)]
    Virtiofsd(#[from] virtiofsd::VirtiofsdError),
    /// The VM's configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A runtime directory.
    #[error("cannot create a runtime directory: {0}")]
    RuntimeDir(std::io::Error),
    /// The VM could not be built or run.
    #[error(transparent)]
    Vm(#[from] crate::Error),
    /// A vCPU failed.
    #[error("{0}")]
    VmFailed(String),
    /// The guest ended without reporting a status.
    #[error("the guest ended ({0}) without reporting the command's status (its console is above)")]
    NoStatus(ExitReason),
}

/// `evmm run ARGS` (`args` without the program name and `run`): parses, runs,
/// returns the exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = RunCli::parse_from(std::iter::once(OsString::from("evmm run")).chain(args));
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if let Some(level) = cli.log_level {
        builder.filter_level(level);
    }
    builder.init();
    match run(&cli, Path::new(crate::vstate::vm::DEFAULT_KVM_DEVICE)) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The shared directory and whether it is read-only, from `--share`.
pub fn parse_share(spec: Option<&str>) -> (PathBuf, bool) {
    match spec {
        None => (PathBuf::from("/"), true),
        Some(s) => match s.strip_suffix(":ro") {
            Some(dir) => (PathBuf::from(dir), true),
            None => (PathBuf::from(s), false),
        },
    }
}

/// The directory the command runs in, as a path in the guest: the current directory
/// relative to the share, else `/`.
fn guest_cwd(share: &Path) -> String {
    let Ok(cwd) = std::env::current_dir() else {
        return "/".into();
    };
    let share = share.canonicalize().unwrap_or_else(|_| share.to_path_buf());
    match cwd.strip_prefix(&share) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => "/".into(),
    }
}

/// Runs `cli` with the KVM at `kvm_device`: the command's status.
pub fn run(cli: &RunCli, kvm_device: &Path) -> Result<u8, RunError> {
    let (share, read_only) = parse_share(cli.share.as_deref());
    if !share.is_dir() {
        return Err(RunError::NoShare(share));
    }
    let exe = virtiofsd::find(cli.virtiofsd.as_deref())?;
    let kernel = match &cli.kernel {
        Some(k) if !k.is_file() => return Err(RunError::KernelMissing(k.clone())),
        Some(k) => k.clone(),
        None => kernel::default_kernel().ok_or(RunError::NoKernel)?,
    };
    let release = kernel::release(&kernel).map_err(|source| RunError::Kernel {
        path: kernel.clone(),
        source,
    })?;
    let modules = match &release {
        Some(r) => modules::find(&kernel, r, Path::new("/"))?,
        None => modules::ModuleSource::None,
    };
    let busybox = initramfs::find_busybox()?;
    let command = GuestCommand {
        argv: cli.command.clone(),
        cwd: guest_cwd(&share),
        read_only,
    };
    if let Some(path) = &cli.write_initramfs {
        initramfs::write(path, &busybox, &command, &modules)?;
        return Ok(0);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(RunError::NotRoot);
    }
    check_kvm()?;

    let dir = tempfile::Builder::new()
        .prefix("evmm-run.")
        .tempdir()
        .map_err(RunError::RuntimeDir)?;
    let bind_point = dir.path().join("share");
    std::fs::create_dir(&bind_point).map_err(RunError::RuntimeDir)?;
    let initrd = dir.path().join("initramfs.cpio");
    initramfs::write(&initrd, &busybox, &command, &modules)?;
    let socket = dir.path().join("virtiofsd.sock");
    let mut daemon = virtiofsd::Virtiofsd::start(
        &exe,
        &share,
        read_only,
        &socket,
        &bind_point,
        &dir.path().join("virtiofsd.log"),
    )?;
    log::info!(
        "virtiofsd serves {} on {}",
        share.display(),
        socket.display()
    );

    let devices = DeviceConfig::new(&[], NotifyMode::Ioeventfd, None)?
        .with_fs(&[format!("tag={TAG},socket={}", socket.display())])?;
    let config = VmConfig::new(
        kernel,
        Some(initrd),
        CMDLINE.to_string(),
        cli.memory,
        cli.cpus,
    )?
    .with_devices(devices)
    .with_exit_device(true)
    .with_console_input(false);
    let outcome = run_vm_thread(config, kvm_device);
    daemon.stop();
    drop(dir);
    match outcome? {
        ExitReason::GuestStatus(status) => Ok(status),
        ExitReason::Signal(n) => Ok(u8::try_from(128 + n).unwrap_or(u8::MAX)),
        ExitReason::Error(e) => Err(RunError::VmFailed(e)),
        other => Err(RunError::NoStatus(other)),
    }
}

/// Runs the VM on a thread of its own, whose seccomp filter is the main thread's of
/// `evmm`, and waits for it: this thread stays free to stop virtiofsd and remove the
/// runtime directory afterwards. The stop signals are blocked here first, so that
/// they reach the VM's signalfd (which stops the VM) and not this thread.
fn run_vm_thread(config: VmConfig, kvm_device: &Path) -> Result<ExitReason, RunError> {
    let set = crate::signals::stop_sigset();
    // SAFETY: `set` is valid; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let kvm_device = kvm_device.to_path_buf();
    let vm = std::thread::Builder::new()
        .name("evmm-vm".into())
        .spawn(move || crate::run(&config, &kvm_device))
        .map_err(|e| RunError::VmFailed(format!("cannot start the VM thread: {e}")))?;
    match vm.join() {
        Ok(outcome) => Ok(outcome?),
        Err(_) => Err(RunError::VmFailed("the VM thread panicked".into())),
    }
}

/// Fails unless this KVM runs guest ring-0 code natively (a quick look, the full
/// probe when that is not conclusive).
fn check_kvm() -> Result<(), RunError> {
    use evmm_kvm_probe::Ring0;
    match evmm_kvm_probe::probe_native_quickly() {
        Ok(report) if report.ring0 == Ring0::Native => Ok(()),
        Ok(report) => Err(RunError::NoLinuxKvm(format!(
            "guest ring-0 code is emulated ({report})"
        ))),
        Err(e) => Err(RunError::NoLinuxKvm(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_defaults_to_the_root_read_only() {
        assert_eq!(parse_share(None), (PathBuf::from("/"), true));
        assert_eq!(parse_share(Some("/srv:ro")), (PathBuf::from("/srv"), true));
        assert_eq!(parse_share(Some("/srv")), (PathBuf::from("/srv"), false));
    }

    #[test]
    fn the_command_runs_in_the_current_directory_when_it_is_shared() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(guest_cwd(Path::new("/")), cwd.display().to_string());
        assert_eq!(guest_cwd(Path::new("/nonexistent-share")), "/");
    }

    #[test]
    fn the_command_is_required_after_the_separator() {
        let parse = |args: &[&str]| {
            RunCli::try_parse_from(std::iter::once("evmm run").chain(args.iter().copied()))
        };
        assert!(parse(&[]).is_err());
        let cli = parse(&["--share", "/tmp", "--", "sh", "-c", "exit 7"]).unwrap();
        assert_eq!(cli.command, ["sh", "-c", "exit 7"]);
        assert_eq!(cli.share.as_deref(), Some("/tmp"));
    }
}
