//! virtio-blk on a raw host file.
//!
//! The device serves IN, OUT, FLUSH (fdatasync), GET_ID, DISCARD (punch hole) and
//! WRITE_ZEROES (zero range, or punch hole with the UNMAP flag; both fall back to
//! writing zeros where the file system cannot). A read-only disk is opened O_RDONLY,
//! offers VIRTIO_BLK_F_RO, and answers OUT, DISCARD and WRITE_ZEROES with
//! VIRTIO_BLK_S_IOERR without touching the file. With `direct` the file is opened
//! O_DIRECT. Data moves straight between the file and guest memory (see [`engine`]
//! for the two engines, `sync` and `io_uring`, and what the device promises about
//! durability).
//!
//! The request code ([`request::Request::parse`], the [`engine`]s,
//! [`chain::process_chain`], [`chain::serve_queue`], [`chain::complete_finished`])
//! knows guest memory, descriptor chains and queues only: the worker and the
//! transport are separate, so the vhost-user-blk backend (`evmm-vhost-user-blk`) runs
//! the same code.
//!
//! Files: `config` (feature bits, configuration space, limits), `request` (parsing a
//! chain), `disk` (the open file), `engine` (executing requests on it), `chain` (one
//! chain and one queue through both), `worker` (the thread that waits on the kicks and
//! the completions), `device` (the [`VirtioDevice`](crate::VirtioDevice)), `metrics`
//! (per-queue counters).
//!
//! # Guest-fault policy
//!
//! A descriptor chain is the guest's to write, so nothing in it may bring the VMM
//! down: no panics, no unbounded allocations. What the device does with a bad chain
//! depends on whether it has somewhere to say so:
//!
//! * **A writable status byte exists** (the last descriptor is device-writable,
//!   non-empty and in guest memory): the request is answered in it and the queue goes
//!   on. `VIRTIO_BLK_S_UNSUPP` for an unknown request type or unsupported
//!   DISCARD/WRITE_ZEROES flags; `VIRTIO_BLK_S_IOERR` for a missing header, a header
//!   in a device-writable descriptor or shorter than 16 bytes, a header or data
//!   descriptor outside guest memory, more than `seg_max` data segments, a segment
//!   larger than `size_max`, a request larger than `seg_max * size_max`, data
//!   descriptors in the wrong direction, IN/OUT data not a multiple of 512 bytes, a
//!   sector range beyond the capacity, malformed DISCARD/WRITE_ZEROES ranges, and
//!   host I/O errors.
//! * **No writable status byte** (empty chain, a chain cut short by a loop, an
//!   out-of-range next index or a bad indirect table — virtio-queue stops such
//!   chains and the device sees the last descriptor still flagged NEXT —, a status
//!   descriptor that is device-readable, empty or outside guest memory) and broken
//!   rings (an available index too far ahead, rings outside memory): the device calls
//!   [`crate::InterruptSignal::set_needs_reset`] (DEVICE_NEEDS_RESET plus a configuration
//!   interrupt) and stops processing that queue until the driver resets the device.
//!
//! Each kind of fault is logged once per device at `warn` (later ones at `debug`),
//! and counted per queue in `malformed_chains`.

pub mod chain;
pub mod config;
pub mod device;
pub mod disk;
pub mod engine;
pub mod metrics;
pub mod request;
mod worker;

pub use chain::{
    complete_finished, complete_request, process_chain, serve_queue, ChainOutcome, ServeContext,
};
pub use device::Block;
pub use engine::{BlockEngine, EngineChoice, EngineKind};

use crate::poll::PollMode;
use std::path::PathBuf;

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// How to open a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The host file.
    pub path: PathBuf,
    /// Offer VIRTIO_BLK_F_RO and refuse writes.
    pub readonly: bool,
    /// What GET_ID returns (at most 20 bytes).
    pub id: Option<String>,
    /// Number of request queues (VIRTIO_BLK_F_MQ when more than 1).
    pub queues: u16,
    /// Open with O_DIRECT.
    pub direct: bool,
    /// How the worker waits for the next request: sleep at once, or poll the
    /// available rings (with the driver's kicks turned off) for a fixed or adaptive
    /// window first ([`crate::poll`]).
    pub poll: PollMode,
    /// Which engine executes the requests.
    pub engine: EngineChoice,
}

/// Errors of opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file cannot be opened.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The path is neither a regular file nor a block device (a FIFO would block the
    /// open, a directory or a socket cannot hold a disk).
    #[error("disk {path} is not a regular file or a block device")]
    NotADisk {
        /// The file.
        path: PathBuf,
    },
    /// Another process holds a lock on the disk that this open conflicts with.
    #[error(
        "disk {path} is in use: another process has it open {held} (evmm locks a disk \
         for writing, or shared with readonly)"
    )]
    Locked {
        /// The file.
        path: PathBuf,
        /// How the other holder has it: "for writing", or "read-only" when this open
        /// wants to write.
        held: &'static str,
    },
    /// A bad setting.
    #[error("bad disk setting: {0}")]
    Config(String),
}

#[cfg(test)]
mod tests;
