//! vhost-user-blk backends for the tests and benchmarks: evmm's own daemon
//! (`evmm-vhost-user-blk`, found on PATH like `evmm`) and QEMU's
//! `qemu-storage-daemon`. Each serves one disk file on a Unix socket that evmm's
//! `--vhost-user-blk socket=PATH` (or QEMU's `vhost-user-blk-pci`) connects to.

use crate::error::{Error, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Which program serves the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// `evmm-vhost-user-blk`, this repository's daemon.
    Evmm,
    /// `qemu-storage-daemon --export type=vhost-user-blk`.
    QemuStorageDaemon,
}

impl BackendKind {
    /// A short name for tables and messages.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Evmm => "evmm-vhost-user-blk",
            BackendKind::QemuStorageDaemon => "qemu-storage-daemon",
        }
    }

    /// The daemon's command line: serve `disk` read-write on `socket` with `queues`
    /// queues, page cache on (as evmm's in-VMM device without `direct=on`).
    pub fn argv(self, disk: &str, socket: &str, queues: u16) -> Vec<String> {
        let words: Vec<String> = match self {
            BackendKind::Evmm => vec![
                "evmm-vhost-user-blk".into(),
                "--socket".into(),
                socket.into(),
                "--disk".into(),
                disk.into(),
                "--queues".into(),
                queues.to_string(),
            ],
            BackendKind::QemuStorageDaemon => vec![
                "qemu-storage-daemon".into(),
                "--blockdev".into(),
                format!("driver=file,node-name=disk,filename={disk},cache.direct=off"),
                "--export".into(),
                format!(
                    "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,\
                     addr.path={socket},writable=on,num-queues={queues}"
                ),
            ],
        };
        words
    }
}

/// A running backend; stopped with SIGTERM (then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Backend {
    kind: BackendKind,
    child: Option<Child>,
    socket: PathBuf,
    log: Option<PathBuf>,
}

impl Backend {
    /// The backend process's id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts `kind` (found on PATH) on `disk`, listening on `socket`, its messages on
    /// this process's stderr, and waits until the socket exists (at most 10 s).
    pub fn start(kind: BackendKind, disk: &Path, socket: &Path, queues: u16) -> Result<Self> {
        let argv = kind.argv(
            &disk.display().to_string(),
            &socket.display().to_string(),
            queues,
        );
        Self::spawn(kind, &argv, socket, None)
    }

    /// Starts the backend command line `argv` (from [`BackendKind::argv`], perhaps
    /// with another program path or more options), its stderr into `log` if given,
    /// and waits until `socket` exists (at most 10 s).
    pub fn spawn(
        kind: BackendKind,
        argv: &[String],
        socket: &Path,
        log: Option<&Path>,
    ) -> Result<Self> {
        let stderr =
            match log {
                Some(path) => Stdio::from(File::create(path).map_err(|e| {
                    Error::Backend(format!("cannot create {}: {e}", path.display()))
                })?),
                None => Stdio::inherit(),
            };
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error::Backend(format!("cannot start {}: {e}", argv.join(" "))))?;
        let mut backend = Self {
            kind,
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.map(Path::to_path_buf),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = backend
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(Error::Backend(format!(
                    "{} exited ({status}) before creating {}{}",
                    kind.name(),
                    socket.display(),
                    backend.log_suffix()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Backend(format!(
                    "{} did not create {} within 10 s{}",
                    kind.name(),
                    socket.display(),
                    backend.log_suffix()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(backend)
    }

    /// The socket the backend listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Which backend this is.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// What the backend wrote to its log so far (empty without a log file).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    fn log_suffix(&self) -> String {
        let log = self.log();
        if log.is_empty() {
            String::new()
        } else {
            format!("; its log:\n{log}")
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the running backend.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid, which it still is: the child is
            // reaped only by `terminate`, `kill` or drop.
            unsafe {
                libc::kill(child.id() as libc::pid_t, signal);
            }
        }
    }

    /// Kills the backend at once (SIGKILL) and reaps it, as a crash would end it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `limit` for the exit; `None` if the backend was
    /// still running then (it is killed).
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid, which it still is: the child is
        // reaped only below.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_name_disk_socket_and_queues() {
        let evmm = BackendKind::Evmm.argv("/d.img", "/s.sock", 2).join(" ");
        assert_eq!(
            evmm,
            "evmm-vhost-user-blk --socket /s.sock --disk /d.img --queues 2"
        );
        let qsd = BackendKind::QemuStorageDaemon
            .argv("/d.img", "/s.sock", 1)
            .join(" ");
        assert!(qsd.starts_with("qemu-storage-daemon --blockdev driver=file"));
        assert!(qsd.contains("filename=/d.img"));
        assert!(qsd.contains("type=vhost-user-blk"));
        assert!(qsd.contains("addr.path=/s.sock"));
        assert!(qsd.contains("num-queues=1"));
    }

    #[test]
    fn a_backend_that_cannot_start_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // qemu-storage-daemon refuses a disk file that does not exist.
        let err = Backend::start(
            BackendKind::QemuStorageDaemon,
            &dir.path().join("missing.img"),
            &dir.path().join("s.sock"),
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("qemu-storage-daemon"), "{err}");
    }
}
