//! A small epoll helper with typed tokens: workers say what woke them with an enum,
//! never with bare integers.

use std::io;
use std::marker::PhantomData;
use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// A value that identifies an event source in an [`EpollHelper`].
pub(crate) trait EpollToken: Copy + Sized {
    /// Encodes the token into epoll's 64-bit user data.
    fn to_raw(self) -> u64;
    /// Decodes epoll's user data; `None` for a value this token type never produces.
    fn from_raw(raw: u64) -> Option<Self>;
}

/// An epoll instance whose events come back as typed tokens.
pub(crate) struct EpollHelper<T: EpollToken> {
    epoll: Epoll,
    events: Vec<EpollEvent>,
    _token: PhantomData<T>,
}

impl<T: EpollToken> EpollHelper<T> {
    /// Creates an epoll instance that returns up to `capacity` events per wait.
    pub(crate) fn new(capacity: usize) -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
            events: vec![EpollEvent::default(); capacity.max(1)],
            _token: PhantomData,
        })
    }

    /// Watches `fd` for readability, reporting it as `token`.
    pub(crate) fn add(&self, fd: RawFd, token: T) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token.to_raw()),
        )
    }

    /// Blocks until at least one source is ready and returns their tokens, after
    /// checking the sources without sleeping, again and again, for up to `window`
    /// (zero: block at once). Interrupted waits are retried; unknown user data is
    /// logged and skipped.
    ///
    /// Each kick of a sleeping worker makes the kernel wake it on the vCPU's exit path
    /// (an IPI to an idle CPU, which on a virtualised host is a costly exit of its
    /// own) before the guest resumes; a worker still polling when the next kick comes
    /// costs the kick nothing but the eventfd write. The price is up to `window` of
    /// CPU after every burst of work.
    pub(crate) fn wait_polling(&mut self, window: Duration) -> io::Result<Vec<T>> {
        let deadline = (!window.is_zero()).then(|| Instant::now() + window);
        let n = loop {
            let timeout = match deadline {
                Some(d) if Instant::now() < d => 0,
                _ => -1,
            };
            match self.epoll.wait(timeout, &mut self.events) {
                Ok(0) => std::hint::spin_loop(),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        Ok(self
            .events
            .iter()
            .take(n)
            .filter_map(|ev| {
                let token = T::from_raw(ev.data());
                if token.is_none() {
                    log::warn!("epoll returned unknown user data {:#x}", ev.data());
                }
                token
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Tok {
        A,
        B,
    }

    impl EpollToken for Tok {
        fn to_raw(self) -> u64 {
            match self {
                Tok::A => 1,
                Tok::B => 2,
            }
        }
        fn from_raw(raw: u64) -> Option<Self> {
            match raw {
                1 => Some(Tok::A),
                2 => Some(Tok::B),
                _ => None,
            }
        }
    }

    #[test]
    fn typed_tokens_come_back() {
        use std::os::unix::io::AsRawFd;
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ep = EpollHelper::<Tok>::new(4).unwrap();
        ep.add(a.as_raw_fd(), Tok::A).unwrap();
        ep.add(b.as_raw_fd(), Tok::B).unwrap();
        b.write(1).unwrap();
        assert_eq!(ep.wait_polling(Duration::ZERO).unwrap(), vec![Tok::B]);
    }

    #[test]
    fn polling_wait_sees_events_during_and_after_its_window() {
        use std::os::unix::io::AsRawFd;
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ep = EpollHelper::<Tok>::new(4).unwrap();
        ep.add(a.as_raw_fd(), Tok::A).unwrap();
        // Ready before the wait: found by the first non-blocking check.
        a.write(1).unwrap();
        assert_eq!(
            ep.wait_polling(Duration::from_millis(50)).unwrap(),
            vec![Tok::A]
        );
        a.read().unwrap();
        // Written long after a short window: the wait has gone on to block.
        let writer = a.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            writer.write(1).unwrap();
        });
        assert_eq!(
            ep.wait_polling(Duration::from_micros(20)).unwrap(),
            vec![Tok::A]
        );
        t.join().unwrap();
    }
}
