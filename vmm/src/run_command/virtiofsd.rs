//! virtiofsd, the vhost-user-fs backend `evmm run` shares a host directory with: found,
//! started on a private socket, stopped on every way out (it is killed with
//! `evmm run` too: parent-death signal).
//!
//! A read-only share is enforced on the host, not only by the guest's mount: virtiofsd
//! starts in a mount namespace of its own where the directory is bound read-only
//! (recursively), and serves that. The sandbox is virtiofsd's own (`namespace`), or
//! `chroot` where the root file system is the initial ramfs, on which pivot_root(2)
//! does not work (as in the nested test host).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the virtiofsd to use.
pub const VIRTIOFSD_ENV: &str = "EVMM_VIRTIOFSD";
/// Where virtiofsd is looked for after `--virtiofsd` and `$EVMM_VIRTIOFSD`: Debian's
/// qemu-system-common, then the Rust virtiofsd package, then PATH.
const VIRTIOFSD_PATHS: &[&str] = &["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"];
/// How long virtiofsd may take to create its socket.
const START_LIMIT: Duration = Duration::from_secs(10);
/// How long virtiofsd may take to end after SIGTERM before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(2);

/// Errors of starting virtiofsd.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    /// No virtiofsd.
    #[error(
        "virtiofsd not found ({} or on PATH): install qemu-system-common, or give \
         --virtiofsd PATH",
        VIRTIOFSD_PATHS.join(", ")
    )]
    NotFound,
    /// The virtiofsd asked for is not there.
    #[error("virtiofsd {0}: no such executable")]
    Missing(PathBuf),
    /// It could not be started.
    #[error("cannot start virtiofsd {path}: {source}")]
    Spawn {
        /// The executable.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It ended or did not create its socket in time.
    #[error("virtiofsd did not come up ({why}); its output: {log}")]
    NoSocket {
        /// What happened.
        why: String,
        /// What it printed.
        log: String,
    },
}

/// The virtiofsd to use: `explicit`, `$EVMM_VIRTIOFSD`, or the first found.
pub fn find(explicit: Option<&Path>) -> Result<PathBuf, VirtiofsdError> {
    let given = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(VIRTIOFSD_ENV).map(PathBuf::from));
    if let Some(path) = given {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(VirtiofsdError::Missing(path))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    VIRTIOFSD_PATHS
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or(VirtiofsdError::NotFound)
}

/// A running virtiofsd; stopped when dropped.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Option<Child>,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Starts `exe` serving `share` on `socket`, read-only when `read_only`;
    /// `bind_point` is an empty directory the read-only bind goes on, `log` the file
    /// its output goes to. Returns once the socket exists.
    pub fn start(
        exe: &Path,
        share: &Path,
        read_only: bool,
        socket: &Path,
        bind_point: &Path,
        log: &Path,
    ) -> Result<Self, VirtiofsdError> {
        let spawn_err = |source| VirtiofsdError::Spawn {
            path: exe.to_path_buf(),
            source,
        };
        let source = if read_only { bind_point } else { share };
        let sandbox = if root_is_initramfs() {
            "chroot"
        } else {
            "namespace"
        };
        let out = File::create(log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let mut cmd = Command::new(exe);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", source.display()))
            .arg("-o")
            .arg(format!("sandbox={sandbox}"))
            .arg("-o")
            .arg("cache=auto")
            .arg("-o")
            .arg("log_level=warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let bind = read_only
            .then(|| {
                let c = |p: &Path| CString::new(p.as_os_str().as_bytes());
                Ok::<_, std::ffi::NulError>((c(share)?, c(bind_point)?))
            })
            .transpose()
            .map_err(|e| spawn_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe system calls on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // Its own process group: a Ctrl-C at the terminal is evmm's to handle.
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some((share, point)) = &bind {
                    bind_read_only(share, point)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        let mut me = Virtiofsd {
            child: Some(child),
            socket: socket.to_path_buf(),
        };
        let started = Instant::now();
        loop {
            if socket.exists() {
                return Ok(me);
            }
            let ended = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            let why = match ended {
                Some(status) => format!("it ended with {status}"),
                None if started.elapsed() > START_LIMIT => {
                    format!("no socket after {} s", START_LIMIT.as_secs())
                }
                None => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            me.stop();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(VirtiofsdError::NoSocket {
                why,
                log: log.trim().replace('\n', " | "),
            });
        }
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// SIGTERM, then SIGKILL after [`STOP_LIMIT`]; waits for it and removes the socket.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on the child's pid, which is not reaped yet.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + STOP_LIMIT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Ok(None) = child.try_wait() {
                log::warn!("virtiofsd did not end on SIGTERM; killing it");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// In a mount namespace of its own, binds `share` (recursively) on `point` read-only.
/// Runs between fork and exec.
fn bind_read_only(share: &CString, point: &CString) -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on NUL-terminated paths that outlive them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            share.as_ptr(),
            point.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ))?;
    }
    // Every mount under the share read-only too (mount_setattr, Linux 5.12), else at
    // least the share's own.
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr with a valid path and a mount_attr of the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            point.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            point.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    })
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
/// MOUNT_ATTR_RDONLY.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// AT_RECURSIVE.
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Whether `/` is the initial ramfs (rootfs), where pivot_root(2) fails.
fn root_is_initramfs() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| root_fs_type(&text).as_deref() == Some("rootfs"))
        .unwrap_or(false)
}

/// The file system type of the last mount on `/` in a mountinfo listing.
fn root_fs_type(mountinfo: &str) -> Option<String> {
    mountinfo
        .lines()
        .rev()
        .filter(|l| l.split_whitespace().nth(4) == Some("/"))
        .find_map(|l| l.split(" - ").nth(1)?.split_whitespace().next())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_file_system_type_comes_from_mountinfo() {
        let initramfs = "1 1 0:2 / / rw - rootfs rootfs rw,size=1000k\n\
                         21 1 0:20 / /proc rw,relatime - proc proc rw\n";
        assert_eq!(root_fs_type(initramfs).as_deref(), Some("rootfs"));
        let disk = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    23 22 0:5 / /dev rw - devtmpfs udev rw\n";
        assert_eq!(root_fs_type(disk).as_deref(), Some("ext4"));
        assert_eq!(root_fs_type(""), None);
    }

    #[test]
    fn an_explicit_virtiofsd_must_exist() {
        let err = find(Some(Path::new("/nonexistent/virtiofsd"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "virtiofsd /nonexistent/virtiofsd: no such executable"
        );
    }
}
