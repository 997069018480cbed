//! Termination signals (SIGTERM, SIGINT, SIGHUP) delivered through a
//! signalfd to the main loop instead of killing evmm, so that the VM is
//! stopped cleanly and the terminal restored.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// A signalfd for [`STOP_SIGNALS`]. Creating it blocks those signals in the
/// calling thread (for good: a late signal must not kill evmm before it has
/// cleaned up); threads started afterwards inherit the mask.
pub struct StopSignals {
    file: File,
}

fn stop_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t and the signals are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Runs `f` with the stop signals blocked in the calling thread and restores the
/// thread's signal mask afterwards. Threads that `f` starts inherit the blocked
/// mask: a thread started before [`StopSignals::new`] (e.g. a vhost-user monitor,
/// started while the VM is built) must not be the one a SIGTERM is delivered to,
/// which would kill evmm instead of reaching the main loop's signalfd.
pub fn with_stop_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    let set = stop_sigset();
    // SAFETY: sigset_t is plain data, filled in by pthread_sigmask.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` and `old` are valid for the call.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) } == 0;
    let r = f();
    if blocked {
        // SAFETY: `old` is the mask pthread_sigmask returned above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
    r
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

#[cfg(test)]
mod tests {
    use super::*;

    fn current_mask() -> libc::sigset_t {
        // SAFETY: sigset_t is plain data, filled in by pthread_sigmask.
        let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: a null new set only reads the mask into `cur`.
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur) };
        cur
    }

    fn is_blocked(set: &libc::sigset_t, sig: libc::c_int) -> bool {
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigismember(set, sig) == 1 }
    }

    #[test]
    fn threads_started_inside_inherit_the_blocked_stop_signals() {
        // A fresh thread, so the test harness's own mask does not matter.
        std::thread::spawn(|| {
            assert!(!is_blocked(&current_mask(), libc::SIGTERM));
            let inner = with_stop_signals_blocked(|| {
                std::thread::spawn(|| {
                    let m = current_mask();
                    STOP_SIGNALS.iter().all(|&s| is_blocked(&m, s))
                })
            });
            assert!(inner.join().unwrap(), "the child thread has them blocked");
            assert!(
                !is_blocked(&current_mask(), libc::SIGTERM),
                "the caller's mask is restored"
            );
        })
        .join()
        .unwrap();
    }
}
