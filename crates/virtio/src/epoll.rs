//! The one epoll helper of every thread that waits on file descriptors (device
//! workers, the vhost-user monitor and takeover, the VMM's main loop): sources are
//! named by a typed token, never by a bare integer, and a wait fills a caller-owned
//! list, so the hot path allocates nothing.

use std::io;
use std::marker::PhantomData;
use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use vmm_sys_util::epoll::EventSet as Events;

/// A value that identifies an event source in an [`EpollHelper`].
pub trait EpollToken: Copy + Sized {
    /// Encodes the token into epoll's 64-bit user data.
    fn to_raw(self) -> u64;
    /// Decodes epoll's user data; `None` for a value this token type never produces.
    fn from_raw(raw: u64) -> Option<Self>;
}

/// An epoll instance whose events come back as typed tokens.
pub struct EpollHelper<T: EpollToken> {
    epoll: Epoll,
    events: Vec<EpollEvent>,
    _token: PhantomData<T>,
}

impl<T: EpollToken> EpollHelper<T> {
    /// Creates an epoll instance that returns up to `capacity` events per wait.
    pub fn new(capacity: usize) -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
            events: vec![EpollEvent::default(); capacity.max(1)],
            _token: PhantomData,
        })
    }

    /// Watches `fd` for readability, reporting it as `token`.
    pub fn add(&self, fd: RawFd, token: T) -> io::Result<()> {
        self.add_events(fd, EventSet::IN, token)
    }

    /// Watches `fd` for `events`, reporting it as `token`.
    pub fn add_events(&self, fd: RawFd, events: EventSet, token: T) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, token.to_raw()),
        )
    }

    /// Changes the events `fd` is watched for.
    pub fn modify(&self, fd: RawFd, events: EventSet, token: T) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, token.to_raw()),
        )
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Waits until a source is ready or `timeout` passes (`None`: no limit), and puts
    /// the ready tokens in `ready` (empty after a timeout). Interrupted waits are
    /// retried; unknown user data is logged and skipped.
    pub fn wait(&mut self, timeout: Option<Duration>, ready: &mut Vec<T>) -> io::Result<()> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let n = loop {
            match self.epoll.wait(ms, &mut self.events) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        self.collect(n, ready);
        Ok(())
    }

    /// Like [`EpollHelper::wait`] without a time limit, but checks the sources without
    /// sleeping, again and again, for up to `window` first (zero: block at once).
    ///
    /// Each kick of a sleeping worker makes the kernel wake it on the vCPU's exit path
    /// (an IPI to an idle CPU, which on a virtualised host is a costly exit of its
    /// own) before the guest resumes; a worker still polling when the next kick comes
    /// costs the kick nothing but the eventfd write. The price is up to `window` of
    /// CPU after every burst of work.
    pub fn wait_polling(&mut self, window: Duration, ready: &mut Vec<T>) -> io::Result<()> {
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
        self.collect(n, ready);
        Ok(())
    }

    fn collect(&self, n: usize, ready: &mut Vec<T>) {
        ready.clear();
        for ev in self.events.iter().take(n) {
            match T::from_raw(ev.data()) {
                Some(token) => ready.push(token),
                None => log::warn!("epoll returned unknown user data {:#x}", ev.data()),
            }
        }
    }
}

/// A token for a fixed set of sources plus a numbered family (e.g. queues):
/// `Fixed(i)` and `Indexed(i)` encode to distinct user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotToken<F> {
    /// One of the named sources.
    Fixed(F),
    /// The source in this slot of a numbered family.
    Indexed(usize),
}

/// A fixed set of named sources (at most 256), encoded as their index in
/// [`FixedToken::ALL`]; alone, or as the named part of a [`SlotToken`].
pub trait FixedToken: Copy + Sized + 'static {
    /// Every value, in a fixed order.
    const ALL: &'static [Self];
}

const INDEXED_BASE: u64 = 256;

/// A fixed set of sources is a token by itself.
impl<F: FixedToken + PartialEq> EpollToken for F {
    fn to_raw(self) -> u64 {
        F::ALL.iter().position(|x| *x == self).unwrap_or(0) as u64
    }

    fn from_raw(raw: u64) -> Option<Self> {
        F::ALL.get(usize::try_from(raw).ok()?).copied()
    }
}

impl<F: FixedToken + PartialEq> EpollToken for SlotToken<F> {
    fn to_raw(self) -> u64 {
        match self {
            SlotToken::Fixed(f) => f.to_raw(),
            SlotToken::Indexed(i) => INDEXED_BASE + i as u64,
        }
    }

    fn from_raw(raw: u64) -> Option<Self> {
        if raw >= INDEXED_BASE {
            usize::try_from(raw - INDEXED_BASE)
                .ok()
                .map(SlotToken::Indexed)
        } else {
            F::from_raw(raw).map(SlotToken::Fixed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Named {
        Kill,
        Other,
    }

    impl FixedToken for Named {
        const ALL: &'static [Self] = &[Named::Kill, Named::Other];
    }

    type Tok = SlotToken<Named>;

    #[test]
    fn slot_tokens_round_trip() {
        for t in [
            Tok::Fixed(Named::Kill),
            Tok::Fixed(Named::Other),
            Tok::Indexed(0),
            Tok::Indexed(70_000),
        ] {
            assert_eq!(Tok::from_raw(t.to_raw()), Some(t));
        }
        assert_eq!(Tok::from_raw(2), None);
    }

    #[test]
    fn typed_tokens_come_back() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ep = EpollHelper::<Tok>::new(4).unwrap();
        ep.add(a.as_raw_fd(), Tok::Fixed(Named::Kill)).unwrap();
        ep.add(b.as_raw_fd(), Tok::Indexed(3)).unwrap();
        b.write(1).unwrap();
        let mut ready = Vec::new();
        ep.wait(None, &mut ready).unwrap();
        assert_eq!(ready, vec![Tok::Indexed(3)]);
        b.read().unwrap();
        ep.wait(Some(Duration::from_millis(10)), &mut ready)
            .unwrap();
        assert!(ready.is_empty());
        ep.remove(a.as_raw_fd()).unwrap();
        a.write(1).unwrap();
        ep.wait(Some(Duration::ZERO), &mut ready).unwrap();
        assert!(ready.is_empty());
    }

    #[test]
    fn polling_wait_sees_events_during_and_after_its_window() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ep = EpollHelper::<Tok>::new(4).unwrap();
        ep.add(a.as_raw_fd(), Tok::Indexed(0)).unwrap();
        let mut ready = Vec::new();
        // Ready before the wait: found by the first non-blocking check.
        a.write(1).unwrap();
        ep.wait_polling(Duration::from_millis(50), &mut ready)
            .unwrap();
        assert_eq!(ready, vec![Tok::Indexed(0)]);
        a.read().unwrap();
        // Written long after a short window: the wait has gone on to block.
        let writer = a.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            writer.write(1).unwrap();
        });
        ep.wait_polling(Duration::from_micros(20), &mut ready)
            .unwrap();
        assert_eq!(ready, vec![Tok::Indexed(0)]);
        t.join().unwrap();
    }
}
