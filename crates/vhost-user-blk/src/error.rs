//! The daemon's errors: everything that stops it from starting or from shutting down
//! cleanly. Trouble with one frontend connection is not among them: it is logged and
//! the daemon waits for the next one.

use evmm_virtio::blk::BlockError;
use std::io;
use std::path::PathBuf;

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk cannot be opened or a disk setting is bad.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// Another process accepts connections on the socket path.
    #[error("socket {path} is in use (a backend is listening on it)")]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket path holds something that is not a socket.
    #[error("{path} exists and is not a socket; not replacing it")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A stale socket file (nobody listening) cannot be removed.
    #[error("cannot remove the stale socket {path}: {source}")]
    StaleSocket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket cannot be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] evmm_seccomp::SeccompError),
    /// SIGTERM/SIGINT handling cannot be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(#[source] io::Error),
    /// The wake-up eventfd of the shutdown path cannot be created.
    #[error("cannot create the shutdown eventfd: {0}")]
    ShutdownEvent(#[source] io::Error),
    /// vhost-user-backend refused to set up a connection's daemon.
    #[error("cannot set up the vhost-user daemon: {0}")]
    Daemon(String),
    /// Waiting for a frontend failed.
    #[error("waiting for a frontend failed: {0}")]
    Wait(#[source] io::Error),
    /// The final fdatasync of the disk failed: written data may not be durable.
    #[error("cannot flush the disk: {0}")]
    Flush(#[source] io::Error),
}
