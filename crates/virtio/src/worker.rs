//! The RAII owner of a device's worker thread.
//!
//! The thread gets a clone of a kill eventfd, which it must watch in its epoll set.
//! Dropping the handle (or calling [`WorkerHandle::stop`]) writes that eventfd and
//! joins the thread, so a device can never leak a worker past its reset.
//!
//! Workers start with the process's stop signals (SIGTERM, SIGINT, SIGHUP) blocked:
//! those are for the VMM's (or daemon's) main thread, which turns them into an orderly
//! shutdown; delivered to a worker, they would kill the process instead.
//!
//! A VMM that confines its threads (seccomp) calls [`start_worker_spawner`] first:
//! from then on every worker is started by one spawner thread, whose own filter
//! allows thread creation and what the workers need, and each worker narrows itself
//! to its [`WorkerKind`] before its body runs. A thread that asks for a worker (a vCPU
//! activating a device) then needs no right to create threads.

use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What a worker thread does, so that it can be confined to that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerKind {
    /// A virtio-blk worker; `io_uring` when that engine executes its requests.
    Block {
        /// Whether the io_uring engine is used.
        io_uring: bool,
    },
    /// A virtio-net worker.
    Net,
    /// The stand-in that fails a lost vhost-user backend's requests.
    Takeover,
    /// The watcher of a vhost-user backend's socket.
    BackendMonitor,
    /// The thread that runs a vhost-user device's activations.
    BackendControl,
}

/// Confines a worker thread to its kind (run on the worker, before its body).
pub type ConfineWorker = Box<dyn Fn(WorkerKind) -> io::Result<()> + Send + Sync>;

type Job = Box<dyn FnOnce() + Send>;

/// The spawner thread's queue of thread starts, and the workers' confinement.
struct Spawner {
    jobs: Mutex<Sender<Job>>,
    confine: ConfineWorker,
}

static SPAWNER: OnceLock<Spawner> = OnceLock::new();

/// Starts the thread that starts every later worker. It first runs `confine_spawner`
/// on itself (an error is returned here, and workers are then started as before);
/// each worker runs `confine_worker` with its kind before its body. Once per process.
pub fn start_worker_spawner(
    confine_spawner: impl FnOnce() -> io::Result<()> + Send + 'static,
    confine_worker: ConfineWorker,
) -> io::Result<()> {
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready_tx, ready) = mpsc::sync_channel::<io::Result<()>>(1);
    with_stop_signals_blocked(|| {
        std::thread::Builder::new()
            .name("evmm-spawner".into())
            .spawn(move || {
                let confined = confine_spawner();
                let ok = confined.is_ok();
                let _ = ready_tx.send(confined);
                if ok {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                }
            })
    })?;
    ready
        .recv()
        .map_err(|_| io::Error::other("the worker spawner ended before it was ready"))??;
    SPAWNER
        .set(Spawner {
            jobs: Mutex::new(jobs),
            confine: confine_worker,
        })
        .map_err(|_| io::Error::other("the worker spawner was already started"))
}

/// Confines the calling worker thread, if the process confines its workers; a worker
/// that cannot be confined must not run.
fn confine_current(kind: WorkerKind) {
    if let Some(spawner) = SPAWNER.get() {
        if let Err(e) = (spawner.confine)(kind) {
            panic!("cannot confine the {kind:?} worker thread: {e}");
        }
    }
}

/// Starts `start` on a thread named `name`: through the spawner when there is one,
/// else from the calling thread.
fn start_thread<T, F>(name: &str, start: F) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let builder = std::thread::Builder::new().name(name.to_string());
    let Some(spawner) = SPAWNER.get() else {
        return with_stop_signals_blocked(|| builder.spawn(start));
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(builder.spawn(start));
    });
    spawner
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("the worker spawner has stopped"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the worker spawner has stopped"))?
}

/// Owns a worker thread that returns a `T` when it stops (e.g. its backend).
pub struct WorkerHandle<T: Send + 'static> {
    kill: EventFd,
    thread: Option<JoinHandle<T>>,
    name: String,
}

impl<T: Send + 'static> WorkerHandle<T> {
    /// Starts `body` on a new thread named `name`, confined to `kind` when the
    /// process confines its workers. `body` receives the kill eventfd it must watch;
    /// it returns when that eventfd becomes readable.
    pub fn spawn<F>(kind: WorkerKind, name: &str, body: F) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        Self::spawn_unconfined(name, move |kill| {
            confine_current(kind);
            body(kill)
        })
    }

    fn spawn_unconfined<F>(name: &str, body: F) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let thread_kill = kill.try_clone()?;
        let thread = start_thread(name, move || body(thread_kill))?;
        Ok(Self {
            kill,
            thread: Some(thread),
            name: name.to_string(),
        })
    }

    /// As [`WorkerHandle::spawn`], for a device's worker: if `body` panics, the panic is
    /// logged and `on_panic` runs on the worker thread before it ends (a device sets
    /// DEVICE_NEEDS_RESET there, so the driver learns that the device stopped instead
    /// of waiting on it forever). A worker that cannot be confined counts as panicked.
    pub fn spawn_guarded<F, P>(
        kind: WorkerKind,
        name: &str,
        on_panic: P,
        body: F,
    ) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
        P: FnOnce() + Send + 'static,
    {
        let thread_name = name.to_string();
        Self::spawn_unconfined(name, move |kill| {
            let run = || {
                confine_current(kind);
                body(kill)
            };
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                Ok(v) => v,
                Err(panic) => {
                    log::error!(
                        "worker {thread_name} panicked; the device needs a reset by its driver"
                    );
                    on_panic();
                    std::panic::resume_unwind(panic)
                }
            }
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

/// Signals that end the process in an orderly way, delivered to its main thread.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// [`STOP_SIGNALS`] as a signal set.
pub fn stop_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
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

/// Runs `f` with [`STOP_SIGNALS`] blocked in the calling thread and restores its
/// signal mask afterwards. Threads that `f` starts inherit the blocked mask.
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

impl<T: Send + 'static> Drop for WorkerHandle<T> {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_utils::wait_readable;

    #[test]
    fn a_worker_that_panics_runs_its_hook_and_stops() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let hooked = Arc::new(AtomicBool::new(false));
        let h = hooked.clone();
        let w = WorkerHandle::<u32>::spawn_guarded(
            WorkerKind::Takeover,
            "t-panic",
            move || h.store(true, Ordering::SeqCst),
            |_kill| panic!("a bug in the worker"),
        )
        .unwrap();
        let start = std::time::Instant::now();
        while w.is_running() {
            assert!(start.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(hooked.load(Ordering::SeqCst));
        assert_eq!(w.stop(), None);
    }

    #[test]
    fn stop_hands_back_the_value() {
        let w = WorkerHandle::spawn(WorkerKind::Takeover, "t-stop", |kill| {
            assert!(wait_readable(&kill));
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
            let _w = WorkerHandle::spawn(WorkerKind::Takeover, "t-drop", move |kill| {
                assert!(wait_readable(&kill));
                tx.send(()).unwrap();
            })
            .unwrap();
        }
        // Already joined: the message is there without waiting.
        assert!(rx.try_recv().is_ok());
    }
}

#[cfg(test)]
mod signal_tests {
    use super::*;

    #[test]
    fn workers_start_with_the_stop_signals_blocked() {
        let w = WorkerHandle::spawn(WorkerKind::Takeover, "t-mask", |kill| {
            // SAFETY: sigset_t is plain data, filled in by pthread_sigmask.
            let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: a null new mask only reads the current one into `mask`.
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) };
            let _ = kill;
            // SAFETY: `mask` is a valid sigset_t.
            STOP_SIGNALS.map(|s| unsafe { libc::sigismember(&mask, s) } == 1)
        })
        .unwrap();
        assert_eq!(w.stop(), Some([true; 3]));
    }
}
