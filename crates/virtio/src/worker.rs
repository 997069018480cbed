//! The RAII owner of a device's worker thread.
//!
//! The thread gets a clone of a kill eventfd, which it must watch in its epoll set.
//! Dropping the handle (or calling [`WorkerHandle::stop`]) writes that eventfd and
//! joins the thread, so a device can never leak a worker past its reset.

use std::io;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Owns a worker thread that returns a `T` when it stops (e.g. its backend).
pub struct WorkerHandle<T: Send + 'static> {
    kill: EventFd,
    thread: Option<JoinHandle<T>>,
    name: String,
}

impl<T: Send + 'static> WorkerHandle<T> {
    /// Starts `body` on a new thread named `name`. `body` receives the kill eventfd
    /// it must watch; it returns when that eventfd becomes readable.
    pub fn spawn<F>(name: &str, body: F) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let thread_kill = kill.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || body(thread_kill))?;
        Ok(Self {
            kill,
            thread: Some(thread),
            name: name.to_string(),
        })
    }

    /// Whether the thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Signals the thread to stop, joins it and returns what it handed back
    /// (`None` if it panicked).
    pub fn stop(mut self) -> Option<T> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<T> {
        let thread = self.thread.take()?;
        if let Err(e) = self.kill.write(1) {
            log::error!("cannot signal worker {} to stop: {e}", self.name);
        }
        match thread.join() {
            Ok(v) => Some(v),
            Err(_) => {
                log::error!("worker {} panicked", self.name);
                None
            }
        }
    }
}

impl<T: Send + 'static> Drop for WorkerHandle<T> {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    fn wait_readable(fd: &EventFd) {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(r, 1);
    }

    #[test]
    fn stop_hands_back_the_value() {
        let w = WorkerHandle::spawn("t-stop", |kill| {
            wait_readable(&kill);
            42u32
        })
        .unwrap();
        assert!(w.is_running());
        assert_eq!(w.stop(), Some(42));
    }

    #[test]
    fn drop_joins() {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let _w = WorkerHandle::spawn("t-drop", move |kill| {
                wait_readable(&kill);
                tx.send(()).unwrap();
            })
            .unwrap();
        }
        // Already joined: the message is there without waiting.
        assert!(rx.try_recv().is_ok());
    }
}
