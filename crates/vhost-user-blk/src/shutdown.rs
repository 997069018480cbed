//! Stopping the daemon from another thread: a flag, an eventfd that wakes the wait
//! for a frontend, and the current connection, which is shut down so its request
//! loop ends.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vhost_user_backend::ShutdownHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// What ended a wait for a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A frontend is connecting.
    Connection,
    /// Shutdown was requested.
    Shutdown,
}

/// A shutdown request shared by the signal thread and the accept loop.
pub struct Shutdown {
    requested: AtomicBool,
    wake: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
}

impl Shutdown {
    /// Not requested yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            connection: Mutex::new(None),
        })
    }

    /// Requests shutdown: wakes the accept loop and ends the current connection.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the accept loop: {e}");
        }
        if let Ok(conn) = self.connection.lock() {
            if let Some(handle) = conn.as_ref() {
                handle.shutdown();
            }
        }
    }

    /// Whether shutdown was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Records the connection being served so that [`Self::request`] ends it; ends it
    /// at once if shutdown was requested already. Cleared by [`Self::untrack`].
    pub fn track(&self, handle: Option<ShutdownHandle>) {
        let Ok(mut conn) = self.connection.lock() else {
            return;
        };
        *conn = handle;
        // Checked under the lock `request` takes: either it sees the handle, or this
        // sees the flag.
        if self.is_requested() {
            if let Some(handle) = conn.as_ref() {
                handle.shutdown();
            }
        }
    }

    /// Forgets the connection.
    pub fn untrack(&self) {
        if let Ok(mut conn) = self.connection.lock() {
            *conn = None;
        }
    }

    /// Blocks until `listener` is readable (a frontend connects) or shutdown is
    /// requested.
    pub fn wait_for_connection(&self, listener: RawFd) -> io::Result<Wake> {
        loop {
            if self.is_requested() {
                return Ok(Wake::Shutdown);
            }
            let mut fds = [
                libc::pollfd {
                    fd: listener,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd structs that outlives the
            // call, and its length is passed with it.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 || self.is_requested() {
                return Ok(Wake::Shutdown);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(io::Error::other("the listening socket failed"));
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(Wake::Connection);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_connecting_frontend_wakes_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let s = Shutdown::new().unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        assert_eq!(
            s.wait_for_connection(listener.as_raw_fd()).unwrap(),
            Wake::Connection
        );
    }

    #[test]
    fn a_request_from_another_thread_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s")).unwrap();
        let s = Arc::new(Shutdown::new().unwrap());
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            s2.request();
        });
        assert_eq!(
            s.wait_for_connection(listener.as_raw_fd()).unwrap(),
            Wake::Shutdown
        );
        t.join().unwrap();
        // And every later wait too.
        assert_eq!(
            s.wait_for_connection(listener.as_raw_fd()).unwrap(),
            Wake::Shutdown
        );
        assert!(s.is_requested());
    }
}
