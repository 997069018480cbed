//! Raw mode for the terminal on standard input, restored when the guard is
//! dropped or, from a panic hook or signal path, by [`restore`].

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

/// The settings to put back, shared with [`restore`].
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Keeps a terminal in raw mode while alive.
pub struct RawModeGuard {
    _private: (),
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawModeGuard {
    /// Puts `fd` in raw mode if it is a terminal; `Ok(None)` if it is not.
    pub fn new(fd: RawFd) -> io::Result<Option<Self>> {
        if !is_tty(fd) {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` is a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so evmm's own messages stay readable.
        raw.c_oflag |= libc::OPOST;
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, saved));
        // SAFETY: fd is a terminal and `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            let err = io::Error::last_os_error();
            *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Err(err);
        }
        Ok(Some(RawModeGuard { _private: () }))
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts back the terminal settings saved by [`RawModeGuard::new`], if any.
/// Safe to call more than once and from a panic hook.
pub fn restore() {
    let saved = match SAVED.try_lock() {
        Ok(mut guard) => guard.take(),
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().take(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    if let Some((fd, termios)) = saved {
        // SAFETY: termios came from tcgetattr on the same fd.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_tty_is_left_alone() {
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        assert!(!is_tty(r.as_raw_fd()));
        assert!(RawModeGuard::new(r.as_raw_fd()).unwrap().is_none());
        restore(); // nothing saved: no-op
    }
}
