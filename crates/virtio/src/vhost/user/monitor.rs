//! The monitor thread of a vhost-user device: it notices that the backend is gone.
//!
//! It waits in epoll on the socket for hang-up only (never for input, which is the
//! replies the frontend reads) and on a kill eventfd, with a short timeout to check
//! the [`Watchdog`]: a request the backend leaves unanswered for longer than
//! [`REQUEST_TIMEOUT`] gets the socket shut down, which both unblocks the waiting
//! request and shows as a hang-up. On hang-up the thread calls its callback once
//! and ends. It is not on the data path: it never touches a queue.

use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::connection::{Watchdog, REQUEST_TIMEOUT};
use crate::epoll::{EpollHelper, Events, FixedToken};
use crate::worker::{WorkerHandle, WorkerKind};

/// How often the watchdog is checked.
const TICK: Duration = Duration::from_millis(200);

/// What woke the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Socket,
    Kill,
}

impl FixedToken for Token {
    const ALL: &'static [Self] = &[Token::Socket, Token::Kill];
}

/// Starts the monitor of `socket` (a clone of the frontend's connection).
/// How a backend was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// It closed its end of the socket (or its process ended).
    HungUp,
    /// It left a request unanswered, or answered with an error: it may still be
    /// running, and serving the rings it was given.
    Unresponsive(String),
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::HungUp => f.write_str("the backend hung up"),
            Loss::Unresponsive(why) => f.write_str(why),
        }
    }
}

/// `on_hang_up` gets the reason when the backend is gone.
pub fn spawn<F>(
    socket: UnixStream,
    watchdog: Arc<Watchdog>,
    on_hang_up: F,
) -> io::Result<WorkerHandle<()>>
where
    F: FnOnce(Loss) + Send + 'static,
{
    let epoll = EpollHelper::new(2)?;
    epoll.add_events(
        socket.as_raw_fd(),
        Events::READ_HANG_UP | Events::HANG_UP | Events::ERROR,
        Token::Socket,
    )?;
    WorkerHandle::spawn(WorkerKind::BackendMonitor, "evmm-vu-monitor", move |kill| {
        body(socket, watchdog, on_hang_up, epoll, kill)
    })
}

/// The thread body: waits for hang-up, the kill eventfd or the next watchdog tick.
fn body<F>(
    socket: UnixStream,
    watchdog: Arc<Watchdog>,
    on_hang_up: F,
    mut epoll: EpollHelper<Token>,
    kill: EventFd,
) where
    F: FnOnce(Loss),
{
    if let Err(e) = epoll.add(kill.as_raw_fd(), Token::Kill) {
        log::error!("vhost-user monitor cannot watch its kill eventfd: {e}");
        return;
    }
    let mut reason = None;
    let mut ready = Vec::with_capacity(2);
    loop {
        if let Err(e) = epoll.wait(Some(TICK), &mut ready) {
            log::error!("vhost-user monitor: epoll_wait failed: {e}");
            return;
        }
        if ready.contains(&Token::Kill) {
            return;
        }
        if ready.contains(&Token::Socket) {
            on_hang_up(reason.map_or(Loss::HungUp, Loss::Unresponsive));
            return;
        }
        if reason.is_none() {
            if let Some(request) = watchdog.overdue(REQUEST_TIMEOUT) {
                reason = Some(format!(
                    "the backend did not answer {request} within {} s",
                    REQUEST_TIMEOUT.as_secs()
                ));
                watchdog.fire();
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn hang_up_is_reported_once() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let handle = spawn(a, Arc::new(Watchdog::default()), move |why| {
            tx.send(why).unwrap();
        })
        .unwrap();
        // Input is not a hang-up.
        use std::io::Write;
        (&b).write_all(b"x").unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
        drop(b);
        let why = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(why, Loss::HungUp);
        assert_eq!(why.to_string(), "the backend hung up");
        handle.stop();
    }

    #[test]
    fn an_unanswered_request_shuts_the_socket_down() {
        let (a, b) = UnixStream::pair().unwrap();
        let watchdog = Arc::new(Watchdog::default());
        let (tx, rx) = mpsc::channel();
        let handle = spawn(a, watchdog.clone(), move |why| {
            tx.send(why).unwrap();
        })
        .unwrap();
        watchdog.begin("GET_VRING_BASE");
        let why = rx
            .recv_timeout(REQUEST_TIMEOUT + Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            why,
            Loss::Unresponsive("the backend did not answer GET_VRING_BASE within 5 s".into())
        );
        // The peer sees the frontend go away.
        use std::io::Read;
        assert_eq!((&b).read(&mut [0u8; 1]).unwrap(), 0);
        handle.stop();
    }

    #[test]
    fn stop_without_hang_up() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel::<Loss>();
        let handle = spawn(a, Arc::new(Watchdog::default()), move |why| {
            tx.send(why).unwrap();
        })
        .unwrap();
        handle.stop();
        assert!(rx.try_recv().is_err());
    }
}
