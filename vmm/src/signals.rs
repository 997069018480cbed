//! Termination signals (SIGTERM, SIGINT, SIGHUP) delivered through a
//! signalfd to the main loop instead of killing evmm, so that the VM is
//! stopped cleanly and the terminal restored.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

pub use evmm_virtio::worker::{stop_sigset, STOP_SIGNALS};

/// A signalfd for [`STOP_SIGNALS`]. Creating it blocks those signals in the
/// calling thread (for good: a late signal must not kill evmm before it has
/// cleaned up); threads started afterwards inherit the mask.
pub struct StopSignals {
    file: File,
}

impl StopSignals {
    /// Blocks the stop signals and opens the signalfd.
    pub fn new() -> io::Result<Self> {
        let set = stop_sigset();
        // SAFETY: `set` is valid; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(StopSignals { file })
    }

    /// Reads one pending signal number, if any.
    pub fn read(&mut self) -> io::Result<Option<i32>> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        // SAFETY: the slice covers exactly `info`, which lives for the call.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut info as *mut libc::signalfd_siginfo).cast::<u8>(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        };
        match self.file.read(buf) {
            Ok(n) if n == buf.len() => Ok(Some(info.ssi_signo as i32)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for StopSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
