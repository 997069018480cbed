//! The nested test host: an "L1" Linux under QEMU's software emulator with emulated
//! AMD SVM, whose /dev/kvm is a genuine KVM that boots Linux guests ("L2").
//!
//! L1 runs Debian's stock kernel with kvm-amd and the initramfs of `guest-images/build`
//! (busybox, QEMU and qemu-storage-daemon with their libraries). Each run appends a
//! payload to it: the repository's release binaries (on PATH in L1), the files of
//! `guest-images/out/` at the same path as here, and the command. L1 runs the command
//! in the repository's directory with its output on a second serial port, which comes
//! back here line by line, followed by the command's exit status.

use crate::cpio::CpioWriter;
use crate::error::{Error, Result};
use crate::images::{repo_root, target_dir, GuestImages};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
const READY: &str = "EVMM-L1-READY-";
const EXIT: &str = "EVMM-L1-EXIT-";

/// What a command run in L1 gave back.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The command's exit status in L1 (127 when it was not found).
    pub status: i32,
    /// Everything it printed, stdout and stderr interleaved, lines joined with '\n'.
    pub output: String,
    /// From starting QEMU to L1 being ready to run the command.
    pub l1_boot: Duration,
    /// How long the command ran.
    pub command_time: Duration,
    /// Why each earlier attempt of this run was given up (the nested host was lost: see
    /// [`Error::lost_the_nested_host`]); empty when the first attempt served.
    pub lost_attempts: Vec<String>,
}

impl RunOutput {
    /// One line on where the time went, naming every attempt that lost the nested host.
    pub fn timing(&self) -> String {
        let mut line = format!(
            "L1 up in {:.1} s, the command {:.1} s",
            self.l1_boot.as_secs_f64(),
            self.command_time.as_secs_f64()
        );
        for (n, why) in self.lost_attempts.iter().enumerate() {
            let first = why.lines().next().unwrap_or_default();
            line.push_str(&format!(
                "; attempt {} lost the nested host: {first}",
                n + 1
            ));
        }
        line
    }
}

/// A callback that sees each output line as it arrives (for progress).
pub type LineSink = Box<dyn FnMut(&str) + Send>;

/// Boots L1 and runs one command in it per [`NestedHost::run`].
pub struct NestedHost {
    images: GuestImages,
    memory_mib: u32,
    cpus: u32,
    boot_limit: Duration,
    command_limit: Duration,
    extra_files: Vec<(PathBuf, String)>,
    on_line: Option<LineSink>,
    temp_parent: PathBuf,
    attempts: u32,
}

impl NestedHost {
    /// A nested host with the images of `guest-images/build` (built first when needed),
    /// 4 GiB and 2 vCPUs for L1, a 3-minute boot limit, a 10-minute command limit and
    /// up to 3 attempts per run.
    pub fn new() -> Result<Self> {
        Ok(Self::with_images(GuestImages::build()?))
    }

    /// A nested host using images that already exist.
    pub fn with_images(images: GuestImages) -> Self {
        Self {
            images,
            memory_mib: 4096,
            cpus: 2,
            boot_limit: Duration::from_secs(180),
            command_limit: Duration::from_secs(600),
            extra_files: Vec::new(),
            on_line: None,
            temp_parent: std::env::temp_dir(),
            attempts: 3,
        }
    }

    /// How long the command may run before it is stopped.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.command_limit = limit;
        self
    }

    /// How many times a run is tried when the nested host is lost (L1 does not come up,
    /// panics, or the command stalls): QEMU's emulated SVM occasionally loses L1 or stalls
    /// an L2 guest, independently of the command. Each lost attempt is logged and listed
    /// in [`RunOutput::lost_attempts`]; the last attempt's error is returned. At least 1.
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// How long L1 may take to come up.
    pub fn boot_timeout(mut self, limit: Duration) -> Self {
        self.boot_limit = limit;
        self
    }

    /// L1's memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// L1's vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Puts the host file `src` at the absolute path `dest` in L1.
    pub fn file(mut self, src: impl Into<PathBuf>, dest: impl Into<String>) -> Self {
        self.extra_files.push((src.into(), dest.into()));
        self
    }

    /// Where each run's temporary folder (the initramfs, L1's console log) is made; the
    /// folder is removed when the run ends. Default: the system's temporary folder.
    pub fn temp_parent(mut self, dir: impl Into<PathBuf>) -> Self {
        self.temp_parent = dir.into();
        self
    }

    /// Calls `sink` with each line of the command's output as it arrives.
    pub fn on_line(mut self, sink: impl FnMut(&str) + Send + 'static) -> Self {
        self.on_line = Some(Box::new(sink));
        self
    }

    /// Boots L1, runs `argv` there (in the repository's directory, release binaries on
    /// PATH), and returns its output and status. A non-zero status is not an error.
    /// A run that loses the nested host is started again on a fresh L1, up to
    /// [`NestedHost::attempts`] times.
    pub fn run<S: AsRef<str>>(&mut self, argv: &[S]) -> Result<RunOutput> {
        let mut lost = Vec::new();
        loop {
            match self.run_once(argv) {
                Ok(mut out) => {
                    out.lost_attempts = lost;
                    return Ok(out);
                }
                Err(e) if e.lost_the_nested_host() && (lost.len() as u32) + 1 < self.attempts => {
                    log::warn!(
                        "attempt {} of {} lost the nested host, starting a fresh L1: {e}",
                        lost.len() + 1,
                        self.attempts
                    );
                    if let Some(sink) = self.on_line.as_mut() {
                        sink(&format!(
                            "(evmm-nested: attempt {} of {} lost the nested host: {}; starting a fresh L1)",
                            lost.len() + 1,
                            self.attempts,
                            e.to_string().lines().next().unwrap_or_default()
                        ));
                    }
                    lost.push(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn run_once<S: AsRef<str>>(&mut self, argv: &[S]) -> Result<RunOutput> {
        let qemu = find_on_path(QEMU).ok_or(Error::QemuMissing)?;
        if !self.images.l1_initramfs.is_file() {
            return Err(Error::ImagesMissing(self.images.l1_initramfs.clone()));
        }
        let _lock = RunLock::acquire()?;
        let work = tempfile::Builder::new()
            .prefix("evmm-nested-")
            .tempdir_in(&self.temp_parent)
            .map_err(|e| Error::Io("cannot create a temporary folder", e))?;
        let nonce = nonce();
        let initrd = work.path().join("l1.cpio");
        self.write_initrd(&initrd, &nonce, argv)
            .map_err(Error::Payload)?;

        let console = work.path().join("console.log");
        let stderr_log = work.path().join("qemu.stderr");
        let mut qemu = Qemu::spawn(&qemu, &self.qemu_args(&initrd, &console), &stderr_log)?;
        let lines = qemu.lines()?;
        let started = Instant::now();

        // A lost L1 keeps its whole console (boot messages, a lockup's backtraces) in
        // target/nested-lost/; the error carries its path and its last lines.
        let diagnostics =
            || keep_console(&console, &nonce) + &tail(&console, 60) + &tail(&stderr_log, 10);
        let ready = format!("{READY}{nonce}");
        wait_for_line(&lines, started + self.boot_limit, |l| l == ready).map_err(|_| {
            let console = diagnostics();
            match qemu.try_status() {
                Some(status) => Error::L1Died { status, console },
                None => Error::L1NotUp {
                    limit: self.boot_limit,
                    console,
                },
            }
        })?;
        let l1_boot = started.elapsed();
        log::info!("nested host up in {:.1} s", l1_boot.as_secs_f64());

        let command_started = Instant::now();
        let deadline = command_started + self.command_limit;
        let exit_prefix = format!("{EXIT}{nonce} status=");
        let mut output = Vec::new();
        let status = loop {
            match recv_until(&lines, deadline) {
                Ok(line) => {
                    if let Some(status) = line.strip_prefix(&exit_prefix) {
                        break status.trim().parse::<i32>().unwrap_or(-1);
                    }
                    if let Some(sink) = self.on_line.as_mut() {
                        sink(&line);
                    }
                    output.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::TimedOut {
                        limit: self.command_limit,
                        output: output.join("\n"),
                        console: diagnostics(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = qemu.wait_status(Duration::from_secs(5));
                    return Err(Error::L1Died {
                        status,
                        console: diagnostics(),
                    });
                }
            }
        };
        let command_time = command_started.elapsed();
        // L1 powers off after the marker; give it a moment, then stop it regardless.
        qemu.wait_status(Duration::from_secs(30));
        Ok(RunOutput {
            status,
            output: output.join("\n"),
            l1_boot,
            command_time,
            lost_attempts: Vec::new(),
        })
    }

    fn qemu_args(&self, initrd: &Path, console: &Path) -> Vec<String> {
        let mut args: Vec<String> = [
            "-M",
            "q35",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "EPYC,+svm,+npt",
            "-display",
            "none",
            "-monitor",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-chardev",
            "stdio,id=out,signal=off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend([
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-serial".into(),
            format!("file:{}", console.display()),
            "-serial".into(),
            "chardev:out".into(),
            "-kernel".into(),
            self.images.vmlinuz.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            // Not quiet, and a soft lockup panics with every CPU's backtrace: L1's
            // console is a file of its own (the command's output is on ttyS1), and a
            // frozen L1 then ends at once with its stacks on record instead of at the
            // command's time limit (README, Known problems).
            "console=ttyS0 panic=-1 softlockup_panic=1 softlockup_all_cpu_backtrace=1".into(),
        ]);
        args
    }

    /// L1's initramfs followed by this run's payload.
    fn write_initrd<S: AsRef<str>>(&self, path: &Path, nonce: &str, argv: &[S]) -> io::Result<()> {
        let mut out = BufWriter::new(File::create(path)?);
        io::copy(&mut File::open(&self.images.l1_initramfs)?, &mut out)?;
        let mut cpio = CpioWriter::new(out);
        let repo = repo_root();
        cpio.dir("payload")?;
        cpio.dir("payload/bin")?;
        // The guest images for `evmm run`, whose default kernel is the stock one.
        let env = format!(
            "EVMM_NONCE={nonce}\nEVMM_CWD={}\nexport EVMM_GUEST_IMAGES={}\n",
            shell_quote(&repo.display().to_string()),
            shell_quote(&self.images.dir.display().to_string())
        );
        cpio.file("payload/env", 0o644, env.as_bytes())?;
        let cmd: Vec<String> = argv.iter().map(|a| shell_quote(a.as_ref())).collect();
        cpio.file(
            "payload/cmd",
            0o755,
            format!("{}\n", cmd.join(" ")).as_bytes(),
        )?;
        let bins = release_binaries()?;
        if bins.is_empty() {
            return Err(io::Error::other(Error::NoBinaries(
                target_dir().join("release"),
            )));
        }
        for bin in bins {
            let name = bin.file_name().unwrap_or_default().to_string_lossy();
            cpio.host_file(&format!("payload/bin/{name}"), 0o755, &bin)?;
        }
        let images_dir = self.images.dir.display().to_string();
        cpio.parents(&format!("{images_dir}/x"))?;
        cpio.dir(&images_dir)?;
        for entry in fs::read_dir(&self.images.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if path.is_file() && !name.starts_with('.') && path != self.images.l1_initramfs {
                cpio.host_file(&format!("{images_dir}/{name}"), 0o644, &path)?;
            }
        }
        for (src, dest) in &self.extra_files {
            let mode = fs::metadata(src)?.permissions().mode();
            cpio.parents(dest)?;
            cpio.host_file(dest, mode, src)?;
        }
        cpio.finish()?;
        Ok(())
    }
}

/// The repository's release executables whose names start with "evmm".
fn release_binaries() -> io::Result<Vec<PathBuf>> {
    let dir = target_dir().join("release");
    let mut bins = Vec::new();
    for entry in fs::read_dir(&dir).into_iter().flatten() {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let executable =
            fs::metadata(&path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if name.starts_with("evmm") && !name.contains('.') && executable.unwrap_or(false) {
            bins.push(path);
        }
    }
    bins.sort();
    Ok(bins)
}

/// QEMU as a child process that dies with this process and is stopped on drop.
struct Qemu {
    child: Child,
}

impl Qemu {
    fn spawn(qemu: &Path, args: &[String], stderr_log: &Path) -> Result<Self> {
        let stderr =
            File::create(stderr_log).map_err(|e| Error::Io("cannot create QEMU's log", e))?;
        let mut cmd = Command::new(qemu);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        // SAFETY: prctl is async-signal-safe and touches no memory of this process; it
        // makes the kernel kill QEMU should this process die without cleaning up.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        log::debug!("starting {} {}", qemu.display(), args.join(" "));
        let child = cmd
            .spawn()
            .map_err(|e| Error::Spawn(qemu.display().to_string(), e))?;
        Ok(Self { child })
    }

    /// QEMU's stdout (L1's second serial port) as lines, read on a thread of its own.
    fn lines(&mut self) -> Result<Receiver<String>> {
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or_else(|| Error::Io("QEMU's stdout", io::ErrorKind::BrokenPipe.into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        if tx
                            .send(line.trim_end_matches(['\n', '\r']).to_string())
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }

    fn try_status(&mut self) -> Option<String> {
        self.child.try_wait().ok().flatten().map(|s| s.to_string())
    }

    /// Waits up to `grace` for QEMU to end, then kills it; returns how it ended.
    fn wait_status(&mut self, grace: Duration) -> String {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_status() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => format!("killed after {grace:?}: {status}"),
            Err(e) => format!("killed after {grace:?}; wait failed: {e}"),
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn recv_until(
    lines: &Receiver<String>,
    deadline: Instant,
) -> std::result::Result<String, RecvTimeoutError> {
    lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
}

/// Consumes lines until one matches; fails on the deadline or when the stream ends.
fn wait_for_line(
    lines: &Receiver<String>,
    deadline: Instant,
    matches: impl Fn(&str) -> bool,
) -> std::result::Result<(), RecvTimeoutError> {
    loop {
        let line = recv_until(lines, deadline)?;
        if matches(&line) {
            return Ok(());
        }
        log::debug!("L1: {line}");
    }
}

/// Serialises nested runs across processes: two emulated L1s on two cores would
/// only slow each other down past their time limits.
struct RunLock {
    _file: File,
}

impl RunLock {
    fn acquire() -> Result<Self> {
        let path = std::env::temp_dir().join("evmm-nested.lock");
        let file =
            File::create(&path).map_err(|e| Error::Io("cannot create the nested-run lock", e))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            log::info!(
                "waiting for another nested run to finish ({})",
                path.display()
            );
            // SAFETY: as above, blocking this time.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                return Err(Error::Io(
                    "cannot lock the nested-run lock",
                    io::Error::last_os_error(),
                ));
            }
        }
        Ok(Self { _file: file })
    }
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn nonce() -> String {
    let mut bytes = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        bytes = (t.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last `n` lines of a file (empty when it cannot be read).
/// Copies a lost L1's console log to `target/nested-lost/` and returns a line naming
/// the copy (empty when there is nothing to keep or it cannot be written).
fn keep_console(console: &Path, nonce: &str) -> String {
    let dir = target_dir().join("nested-lost");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let kept = dir.join(format!("{secs}-{nonce}-console.log"));
    match fs::create_dir_all(&dir).and_then(|_| fs::copy(console, &kept)) {
        Ok(_) => format!("(L1's whole console: {})\n", kept.display()),
        Err(e) => {
            log::warn!("cannot keep L1's console {}: {e}", console.display());
            String::new()
        }
    }
}

fn tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("cat"), "cat");
        assert_eq!(shell_quote("/proc/cpuinfo"), "/proc/cpuinfo");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(), nonce());
        assert_eq!(nonce().len(), 16);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("log");
        fs::write(&f, "1\n2\n3\n4\n").unwrap();
        assert_eq!(tail(&f, 2), "3\n4\n");
        assert_eq!(tail(&dir.path().join("none"), 2), "");
    }
}
