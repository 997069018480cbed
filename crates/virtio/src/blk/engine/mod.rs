//! Block engines: what executes a queue's requests on the disk file.
//!
//! An engine takes a parsed request ([`BlockEngine::submit`]) and either answers it at
//! once or keeps it in flight and reports it later ([`BlockEngine::reap`], when its
//! [`BlockEngine::completion_fd`] is readable). Requests may complete in any order;
//! the caller writes their status bytes and used entries in completion order.
//!
//! * [`sync::SyncEngine`] (`engine=sync`): one request at a time on the worker's
//!   thread, preadv/pwritev straight between the file and guest memory.
//! * [`uring::UringEngine`] (`engine=io_uring`): one ring per queue, every request of
//!   the queue in flight at once.
//!
//! # What the device promises about durability
//!
//! * With VIRTIO_BLK_F_FLUSH negotiated (writeback), a completed write may sit in the
//!   host's page cache. A FLUSH completes only after every write that was submitted
//!   before it (so every write the driver saw completed before it sent the FLUSH) is
//!   on stable storage (fdatasync): the sync engine runs requests one at a time, and
//!   the io_uring engine submits the fdatasync with IOSQE_IO_DRAIN.
//! * Without it (write-through), a write completes only once it is durable:
//!   fdatasync after it (sync) or RWF_DSYNC on it (io_uring).
//! * Requests other than FLUSH are not ordered among themselves, as virtio-blk allows:
//!   a driver that needs one write after another waits for the first's completion.

pub mod iovec;
pub mod sync;
pub mod uring;

use super::disk::{Completion, DiskFile};
use super::request::{Request, RequestType};
use super::BlockError;
use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::str::FromStr;
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use sync::SyncEngine;
pub use uring::UringEngine;

/// Room for the iovecs of a request of `SEG_MAX` segments, each split once between
/// memory regions; kept per slot so that the hot path allocates nothing.
pub(crate) const IOVECS_PER_REQUEST: usize = 2 * super::config::SEG_MAX as usize;

/// A request an engine finished: where its answer goes and what it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The chain's head index.
    pub head: u16,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
    /// What the request was.
    pub request_type: RequestType,
    /// How it went.
    pub completion: Completion,
}

/// What became of a submitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Finished already.
    Done(Completion),
    /// In the kernel: [`BlockEngine::reap`] reports it.
    InFlight,
}

/// Executes one queue's requests on the disk file.
pub trait BlockEngine: Send {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;

    /// With writeback (the driver negotiated VIRTIO_BLK_F_FLUSH) writes may stay in
    /// the host page cache until FLUSH; without it each write is durable when it
    /// completes.
    fn set_writeback(&mut self, writeback: bool);

    /// Starts `req`, the chain with head index `head`, whose buffers are in `mem` (kept
    /// mapped by the engine while the request is in flight). Does not write the
    /// status byte.
    fn submit(&mut self, head: u16, req: &Request, mem: &Arc<GuestMemoryMmap>) -> Submitted;

    /// Hands the requests submitted since the last call to the kernel (one system
    /// call for a whole drain of the queue).
    fn start(&mut self) -> io::Result<()>;

    /// The eventfd that becomes readable when requests complete (`None`: every request
    /// completes in [`BlockEngine::submit`]).
    fn completion_fd(&self) -> Option<RawFd>;

    /// Appends the requests that completed since the last call to `done`, in the order
    /// they completed.
    fn reap(&mut self, done: &mut Vec<Finished>);

    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Whether completions are waiting to be reaped, without a system call (for a
    /// polling worker).
    fn has_completions(&mut self) -> bool {
        false
    }

    /// Blocks until nothing is in flight, appending every completion to `done`.
    fn wait_idle(&mut self, done: &mut Vec<Finished>);
}

/// The engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// [`SyncEngine`].
    Sync,
    /// [`UringEngine`].
    IoUring,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Sync => "sync",
            EngineKind::IoUring => "io_uring",
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring where this host allows it, else sync (with one warning saying why).
    #[default]
    Auto,
    /// This engine, or an error before the guest starts.
    Only(EngineKind),
}

impl FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "sync" => Ok(EngineChoice::Only(EngineKind::Sync)),
            "io_uring" => Ok(EngineChoice::Only(EngineKind::IoUring)),
            _ => Err(format!("engine={s}: expected io_uring, sync or auto")),
        }
    }
}

impl EngineChoice {
    /// The engine to use on this host: probes io_uring unless `sync` was asked for.
    /// `Auto` falls back to sync with one `warn` line; an explicit `io_uring` that the
    /// host refuses is an error.
    pub fn resolve(self) -> Result<EngineKind, BlockError> {
        self.resolve_with(uring::probe)
    }

    /// [`EngineChoice::resolve`] with `probe` standing for this host's io_uring check
    /// (so that both branches are tested on every host).
    fn resolve_with(
        self,
        probe: impl FnOnce() -> io::Result<()>,
    ) -> Result<EngineKind, BlockError> {
        match self {
            EngineChoice::Only(EngineKind::Sync) => Ok(EngineKind::Sync),
            EngineChoice::Only(EngineKind::IoUring) => probe()
                .map(|()| EngineKind::IoUring)
                .map_err(|e| BlockError::Config(format!("engine=io_uring: {}", why(&e)))),
            EngineChoice::Auto => match probe() {
                Ok(()) => Ok(EngineKind::IoUring),
                Err(e) => {
                    log::warn!(
                        "io_uring is not available ({}): disks use the sync engine",
                        why(&e)
                    );
                    Ok(EngineKind::Sync)
                }
            },
        }
    }
}

/// An io_uring set-up error in words.
fn why(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => format!("the kernel has no io_uring: {e}"),
        Some(libc::EPERM) => format!(
            "io_uring is not permitted (kernel.io_uring_disabled, or a seccomp filter): {e}"
        ),
        Some(libc::ENOMEM) => format!("no memory for a ring (RLIMIT_MEMLOCK?): {e}"),
        _ => e.to_string(),
    }
}

/// An engine of `kind` for a queue of `queue_size` entries on `disk`. An io_uring ring
/// that cannot be set up now (it could when the kind was resolved) gives the sync
/// engine, with a warning.
pub fn open(kind: EngineKind, disk: &Arc<DiskFile>, queue_size: u16) -> Box<dyn BlockEngine> {
    match kind {
        EngineKind::Sync => Box::new(SyncEngine::new(disk.clone())),
        EngineKind::IoUring => match UringEngine::new(disk.clone(), queue_size) {
            Ok(engine) => Box::new(engine),
            Err(e) => {
                log::warn!(
                    "cannot set up an io_uring ring ({}): this queue uses the sync engine",
                    why(&e)
                );
                Box::new(SyncEngine::new(disk.clone()))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(errno: i32) -> impl FnOnce() -> io::Result<()> {
        move || Err(io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn auto_falls_back_to_sync_where_io_uring_is_refused_and_says_why() {
        for errno in [libc::ENOSYS, libc::EPERM, libc::ENOMEM] {
            assert_eq!(
                EngineChoice::Auto.resolve_with(refused(errno)).unwrap(),
                EngineKind::Sync
            );
            let e = EngineChoice::Only(EngineKind::IoUring)
                .resolve_with(refused(errno))
                .unwrap_err()
                .to_string();
            assert!(e.contains("engine=io_uring"), "{e}");
        }
        let e = EngineChoice::Only(EngineKind::IoUring)
            .resolve_with(refused(libc::EPERM))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not permitted"), "{e}");
        let e = EngineChoice::Only(EngineKind::IoUring)
            .resolve_with(refused(libc::ENOSYS))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no io_uring"), "{e}");
        // Where the probe passes, auto takes io_uring; sync never probes.
        assert_eq!(
            EngineChoice::Auto.resolve_with(|| Ok(())).unwrap(),
            EngineKind::IoUring
        );
        assert_eq!(
            EngineChoice::Only(EngineKind::Sync)
                .resolve_with(|| panic!("sync must not probe io_uring"))
                .unwrap(),
            EngineKind::Sync
        );
    }

    #[test]
    fn this_host_gives_io_uring_or_auto_says_why_not() {
        match uring::probe() {
            Ok(()) => assert_eq!(EngineChoice::Auto.resolve().unwrap(), EngineKind::IoUring),
            Err(e) => {
                eprintln!("io_uring refused here ({e}): auto takes the sync engine");
                assert_eq!(EngineChoice::Auto.resolve().unwrap(), EngineKind::Sync);
            }
        }
    }

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse(), Ok(EngineChoice::Auto));
        assert_eq!("sync".parse(), Ok(EngineChoice::Only(EngineKind::Sync)));
        assert_eq!(
            "io_uring".parse(),
            Ok(EngineChoice::Only(EngineKind::IoUring))
        );
        assert!("aio".parse::<EngineChoice>().is_err());
        assert_eq!(EngineKind::IoUring.to_string(), "io_uring");
    }
}
