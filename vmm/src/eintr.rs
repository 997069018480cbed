//! Retrying KVM ioctls that the kernel interrupted.
//!
//! `KVM_CREATE_VM` failed with EINTR on this project's PVM host during a chaos soak
//! (once in 17 starts, no signal sent to evmm); like any call that returns EINTR
//! before doing anything, it can be repeated.

use kvm_ioctls::Error;

/// Most attempts before an EINTR is returned to the caller.
pub const MAX_ATTEMPTS: u32 = 100;

/// Calls `f` until it returns anything but EINTR, at most [`MAX_ATTEMPTS`] times.
pub fn retry<T>(mut f: impl FnMut() -> Result<T, Error>) -> Result<T, Error> {
    let mut attempts = 1;
    loop {
        match f() {
            Err(e) if e.errno() == libc::EINTR && attempts < MAX_ATTEMPTS => attempts += 1,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_call_is_repeated_until_it_answers() {
        let mut calls = 0;
        let r = retry(|| {
            calls += 1;
            if calls < 3 {
                Err(Error::new(libc::EINTR))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3);
    }

    #[test]
    fn other_errors_return_at_once_and_eintr_after_the_last_attempt() {
        let mut calls = 0;
        let r: Result<(), _> = retry(|| {
            calls += 1;
            Err(Error::new(libc::EBADF))
        });
        assert_eq!(r.unwrap_err().errno(), libc::EBADF);
        assert_eq!(calls, 1);
        calls = 0;
        let r: Result<(), _> = retry(|| {
            calls += 1;
            Err(Error::new(libc::EINTR))
        });
        assert_eq!(r.unwrap_err().errno(), libc::EINTR);
        assert_eq!(calls, MAX_ATTEMPTS);
    }
}
