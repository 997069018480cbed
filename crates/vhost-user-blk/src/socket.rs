//! The listening socket: refuses to take over a path another backend listens on or
//! that is not a socket, replaces a stale socket nobody listens on, and removes its
//! file when dropped (if the file still is the one it created).

use crate::error::Error;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A bound, listening socket file.
pub struct SocketFile {
    path: PathBuf,
    /// (st_dev, st_ino) of the file created, to remove only that file.
    identity: Option<(u64, u64)>,
    listener: UnixListener,
}

impl SocketFile {
    /// Creates and listens on the socket at `path`, with permissions `mode`. Call it
    /// before starting threads: the file is created under a umask that gives it `mode`
    /// (umask is per process).
    pub fn bind(path: &Path, mode: u32) -> Result<Self, Error> {
        let listen_err = |source| Error::Listen {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(Error::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::SocketInUse {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::info!("replacing the stale socket {}", path.display());
                    std::fs::remove_file(path).map_err(|source| Error::StaleSocket {
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
                Err(e) => return Err(listen_err(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen_err(e)),
        }
        // Bound under a temporary name and renamed into place once listening: a
        // frontend that connects as soon as the file appears is never refused.
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(path.file_name().unwrap_or_default());
        tmp_name.push(format!(".{}.binding", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        // The file gets `mode` as it is created (a socket file is made 0777 & !umask),
        // so there is no moment in which it is open to more users.
        // SAFETY: umask has no preconditions; the old mask is put back right after.
        let old = unsafe { libc::umask(!mode & 0o777) };
        let bound = UnixListener::bind(&tmp);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(listen_err)?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(listen_err(e));
        }
        listener.set_nonblocking(true).map_err(listen_err)?;
        let identity = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Self {
            path: path.to_path_buf(),
            identity,
            listener,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A frontend that is connecting, if there is one (the socket does not block).
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    return Ok(Some(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for SocketFile {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.identity {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::error!("cannot remove the socket {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_and_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vu.sock");
        let s = SocketFile::bind(&path, 0o600).unwrap();
        assert!(path.exists());
        assert_eq!(s.path(), path);
        drop(s);
        assert!(!path.exists());
    }

    #[test]
    fn a_socket_in_use_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vu.sock");
        let first = SocketFile::bind(&path, 0o600).unwrap();
        let e = SocketFile::bind(&path, 0o600).err().unwrap();
        assert!(matches!(e, Error::SocketInUse { .. }), "{e}");
        assert!(path.exists());
        drop(first);
    }

    #[test]
    fn the_socket_gets_the_mode_asked_for() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o660, 0o666] {
            let path = dir.path().join(format!("vu-{mode:o}.sock"));
            let _s = SocketFile::bind(&path, mode).unwrap();
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(got, mode);
        }
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vu.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let s = SocketFile::bind(&path, 0o600).unwrap();
        UnixStream::connect(&path).unwrap();
        drop(s);
    }

    #[test]
    fn a_regular_file_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"precious").unwrap();
        let e = SocketFile::bind(&path, 0o600).err().unwrap();
        assert!(matches!(e, Error::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let e = SocketFile::bind(Path::new("/nonexistent-dir/vu.sock"), 0o600)
            .err()
            .unwrap();
        let text = e.to_string();
        assert!(text.contains("/nonexistent-dir/vu.sock"), "{text}");
        assert!(text.contains("No such file"), "{text}");
    }

    #[test]
    fn a_replaced_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vu.sock");
        let s = SocketFile::bind(&path, 0o600).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(s);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }
}
