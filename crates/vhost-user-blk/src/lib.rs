//! evmm-vhost-user-blk: a vhost-user-blk backend daemon.
//!
//! It serves a raw disk file to a vhost-user frontend (QEMU's `vhost-user-blk-pci`,
//! evmm) over a UNIX socket, built on the rust-vmm `vhost` and `vhost-user-backend`
//! crates. The virtio-blk request handling is evmm's own ([`evmm_virtio::blk`]: the
//! same parser, executor, EVENT_IDX drain loop, features and configuration space as
//! the in-VMM device), so both hosts of the device behave alike.
//!
//! # Threads
//!
//! * the main thread waits for a frontend (poll on the listening socket and a
//!   shutdown eventfd), accepts it if its user is admitted ([`gate`]), builds a fresh
//!   [`backend::BlkBackend`] and `VhostUserDaemon` for it, and waits for the
//!   connection to end;
//! * per connection, a relay thread carries the frontend's messages (and their file
//!   descriptors) to vhost-user-backend and back, and ends a connection that does not
//!   send SET_OWNER in time;
//! * per connection, vhost-user-backend's request thread handles the frontend's
//!   messages, and one worker thread per queue serves that queue's kicks;
//! * a signal thread turns SIGTERM/SIGINT into a [`shutdown::Shutdown`] request.
//!
//! # Lifecycle
//!
//! When a frontend disconnects (or breaks the protocol: vhost answers a bad message
//! with an error and drops the connection) the connection's daemon is dropped, its
//! worker threads joined, the disk fdatasynced, and the next frontend gets a fresh
//! backend: no negotiated state carries over. SIGTERM/SIGINT end the current
//! connection, fdatasync the disk, remove the socket file and exit 0.

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod device;
pub mod error;
pub mod exit_events;
pub mod gate;
pub mod queue;
pub mod server;
pub mod shutdown;
pub mod signals;
pub mod socket;

pub use error::Error;

use evmm_virtio::blk::BlockConfig;
use std::path::PathBuf;
use std::sync::Arc;

/// Who may connect, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateConfig {
    /// The socket file's permission bits.
    pub socket_mode: u32,
    /// The users whose frontends are served.
    pub admitted: gate::Admitted,
    /// How long a frontend may take to send SET_OWNER.
    pub handshake: std::time::Duration,
}

/// What the daemon serves, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The socket to listen on.
    pub socket: PathBuf,
    /// The threads' seccomp filters.
    pub seccomp: evmm_seccomp::Mode,
    /// Who may connect.
    pub gate: GateConfig,
    /// The disk, with evmm's own disk settings.
    pub disk: BlockConfig,
}

/// Runs the daemon until SIGTERM or SIGINT. Blocks those signals in the calling
/// thread first, so call it before starting other threads.
pub fn run(config: &Config) -> Result<(), Error> {
    signals::block_terminating_signals().map_err(Error::Signals)?;
    let device = device::BlockDevice::open(&config.disk)?;
    let shutdown = Arc::new(shutdown::Shutdown::new().map_err(Error::ShutdownEvent)?);
    let socket = socket::SocketFile::bind(&config.socket, config.gate.socket_mode)?;
    signals::spawn_signal_thread(shutdown.clone(), config.seccomp).map_err(Error::Signals)?;
    // The main thread starts every other thread from now on; they inherit its filter
    // and narrow themselves to their own as they start (or at their first message).
    evmm_seccomp::set_process_mode(config.seccomp);
    evmm_seccomp::confine(evmm_seccomp::ThreadKind::DaemonMain, config.seccomp)?;
    server::Server::new(device, socket, shutdown, config.gate.clone()).run()
}
