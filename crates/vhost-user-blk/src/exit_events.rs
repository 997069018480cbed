//! The exit eventfds of the vring worker threads.
//!
//! vhost-user-backend stops a worker thread through the eventfd pair that
//! [`vhost_user_backend::VhostUserBackend::exit_event`] returns, and 0.24 registers the
//! consumer end with its epoll through `into_raw_fd()` without ever closing it: one
//! descriptor leaks per worker thread per daemon. This daemon builds a fresh
//! vhost-user daemon for every connection, so it remembers those descriptors and
//! closes them once the connection's daemon (and with it every worker thread and
//! epoll instance) is gone. A descriptor is closed only if it still is an eventfd, so
//! a vhost-user-backend that one day closes it itself does not make this close a
//! stranger's descriptor: nothing else creates eventfds between the daemon's end and
//! [`ExitEvents::close_leaked`], and the daemon's own long-lived eventfd was open
//! (so its number taken) when the leaked ones were created.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Mutex;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The exit eventfds handed to one connection's worker threads.
#[derive(Debug, Default)]
pub struct ExitEvents {
    handed_out: Mutex<Vec<RawFd>>,
}

impl ExitEvents {
    /// A new pair for a worker thread, remembering the consumer end.
    pub fn create(&self) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                if let Ok(mut fds) = self.handed_out.lock() {
                    fds.push(consumer.as_raw_fd());
                }
                Some((consumer, notifier))
            }
            Err(e) => {
                // Without an exit event the worker thread could never be stopped.
                log::error!("cannot create a worker exit eventfd: {e}");
                None
            }
        }
    }

    /// Closes the consumer ends vhost-user-backend leaked. Call only after the
    /// connection's `VhostUserDaemon` is dropped (its worker threads joined).
    pub fn close_leaked(&self) {
        let fds = match self.handed_out.lock() {
            Ok(mut fds) => std::mem::take(&mut *fds),
            Err(_) => return,
        };
        for fd in fds {
            if is_eventfd(fd) {
                // SAFETY: `fd` is the consumer end of an exit eventfd this module
                // created; vhost-user-backend took it over with into_raw_fd() and keeps
                // no owner of it, and its users (the worker's epoll and thread) are
                // gone. It still is an eventfd (checked just above), so it has not been
                // closed and reused for anything else. Closing it twice is impossible:
                // the list was taken.
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// Whether `fd` is an open eventfd of this process.
fn is_eventfd(fd: RawFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::IntoRawFd;

    #[test]
    fn leaked_consumers_are_closed_and_nothing_else() {
        let events = ExitEvents::default();
        let (consumer, notifier) = events.create().unwrap();
        let leaked = consumer.into_raw_fd();
        assert!(is_eventfd(leaked));
        events.close_leaked();
        assert!(!is_eventfd(leaked), "the leaked consumer is still open");
        // The notifier is still owned and usable.
        notifier.notify().unwrap();
        // A second call has nothing left to close.
        let other = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        events.close_leaked();
        other.write(1).unwrap();
    }

    #[test]
    fn a_descriptor_that_is_no_eventfd_is_left_alone() {
        let events = ExitEvents::default();
        let (consumer, _notifier) = events.create().unwrap();
        let fd = consumer.into_raw_fd();
        let f = tempfile::tempfile().unwrap();
        // SAFETY: `fd` was leaked by into_raw_fd and is owned by nobody; dup2 atomically
        // replaces it with a copy of the file's descriptor (no window for another
        // thread to take the number).
        assert_eq!(unsafe { libc::dup2(f.as_raw_fd(), fd) }, fd);
        events.close_leaked();
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}"));
        assert!(target.is_ok(), "a descriptor that is no eventfd was closed");
        // SAFETY: `fd` is the duplicate made above, owned by this test alone.
        unsafe { libc::close(fd) };
    }
}
