//! The thread that runs a vhost-user device's activations, so that the vCPU whose
//! DRIVER_OK write asked for one goes back to the guest at once instead of waiting for
//! the backend's answers (up to [`super::connection::REQUEST_TIMEOUT`]).
//!
//! Jobs run in the order they were submitted. A job that a reset made stale is the
//! submitter's to recognise (the device compares generations under its lock).

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::epoll::{EpollHelper, FixedToken};
use crate::worker::{WorkerHandle, WorkerKind};

/// Work for the control thread.
pub type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Wake,
    Kill,
}

impl FixedToken for Token {
    const ALL: &'static [Self] = &[Token::Wake, Token::Kill];
}

/// A running control thread.
pub struct Control {
    jobs: Mutex<Sender<Job>>,
    wake: EventFd,
    worker: WorkerHandle<()>,
}

impl Control {
    /// Starts the control thread of the device `name`.
    pub fn spawn(name: &str) -> io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let thread_wake = wake.try_clone()?;
        let label = name.to_string();
        let worker =
            WorkerHandle::spawn(WorkerKind::BackendControl, "evmm-vu-control", move |kill| {
                if let Err(e) = run(&queue, &thread_wake, &kill) {
                    log::error!("{label}: the vhost-user control thread stopped: {e}");
                }
            })?;
        Ok(Control {
            jobs: Mutex::new(jobs),
            wake,
            worker,
        })
    }

    /// Queues `job` for the control thread.
    pub fn submit(&self, job: Job) -> io::Result<()> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| io::Error::other("the vhost-user control thread has stopped"))?;
        self.wake.write(1)
    }

    /// Stops the thread once the job it is running (if any) returns; queued jobs are
    /// dropped.
    pub fn stop(self) {
        self.worker.stop();
    }
}

fn run(queue: &Receiver<Job>, wake: &EventFd, kill: &EventFd) -> io::Result<()> {
    let mut epoll = EpollHelper::<Token>::new(2)?;
    epoll.add(wake.as_raw_fd(), Token::Wake)?;
    epoll.add(kill.as_raw_fd(), Token::Kill)?;
    let mut ready = Vec::with_capacity(2);
    loop {
        epoll.wait(None, &mut ready)?;
        if ready.contains(&Token::Kill) {
            return Ok(());
        }
        let _ = wake.read();
        while let Ok(job) = queue.try_recv() {
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn jobs_run_in_order_on_the_control_thread_and_stop_ends_it() {
        let control = Control::spawn("t").unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..5 {
            let tx = tx.clone();
            control
                .submit(Box::new(move || {
                    let name = std::thread::current().name().map(str::to_string);
                    tx.send((i, name)).unwrap();
                }))
                .unwrap();
        }
        for i in 0..5 {
            let (j, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(j, i);
            assert_eq!(name.as_deref(), Some("evmm-vu-control"));
        }
        let start = Instant::now();
        control.stop();
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
