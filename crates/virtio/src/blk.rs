//! virtio-blk on a raw host file.
//!
//! The device serves IN, OUT, FLUSH (fdatasync), GET_ID, DISCARD (punch hole) and
//! WRITE_ZEROES (zero range, or punch hole with the UNMAP flag; both fall back to
//! writing zeros where the file system cannot). A read-only disk is opened O_RDONLY,
//! offers VIRTIO_BLK_F_RO, and answers OUT, DISCARD and WRITE_ZEROES with
//! VIRTIO_BLK_S_IOERR without touching the file. With `direct` the file is opened
//! O_DIRECT; all disk I/O goes through a page-aligned bounce buffer anyway.
//!
//! The request code ([`request::Request::parse`], [`backend::BlockBackend::execute`],
//! [`process_chain`], [`drain::drain_queue`]) knows guest memory, descriptor chains
//! and queues only: the worker and the transport are separate, so the vhost-user-blk
//! backend (`evmm-vhost-user-blk`) runs the same code.
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

pub mod backend;
pub mod config;
pub mod drain;
pub mod request;
mod worker;

use crate::device::{ActivateContext, ActivateError, VirtioDevice};
use crate::metrics::{DeviceMetricsSnapshot, QueueMetrics};
use crate::worker::WorkerHandle;
use backend::{BlockBackend, Completion, DiskFile};
use request::{Fault, ParseError, Request, RequestLimits, RequestType};
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestMemory};
use worker::{BlockWorker, WorkerQueue};

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
    /// After serving a kick, the worker polls its kick eventfds for this many
    /// microseconds before it blocks (0: block at once). A worker still polling when
    /// the next kick comes spares the guest's kick the wake-up of a sleeping thread,
    /// which is costly where waking an idle CPU is an exit of its own (a virtualised
    /// host); the price is up to that much CPU after every burst of requests.
    pub poll_us: u32,
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
    /// A bad setting.
    #[error("bad disk setting: {0}")]
    Config(String),
}

/// A guest fault seen by the worker, for logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestFault {
    /// A bad descriptor chain.
    Chain(Fault),
    /// A bad available/used ring.
    Ring(String),
}

/// Logs each kind of guest fault once per device (at warn), later ones at debug.
#[derive(Debug, Default)]
pub struct FaultLog {
    seen: AtomicU64,
}

impl FaultLog {
    /// Logs `fault` seen on queue `queue`.
    pub fn report(&self, queue: usize, fault: &GuestFault) {
        let bit = match fault {
            GuestFault::Chain(f) => f.index().min(62),
            GuestFault::Ring(_) => 63,
        };
        let first = self.seen.fetch_or(1 << bit, Ordering::Relaxed) & (1 << bit) == 0;
        let text = match fault {
            GuestFault::Chain(f) => f.to_string(),
            GuestFault::Ring(s) => s.clone(),
        };
        if first {
            log::warn!("virtio-blk queue {queue}: guest fault: {text} (further ones of this kind are logged at debug)");
        } else {
            log::debug!("virtio-blk queue {queue}: guest fault: {text}");
        }
    }
}

/// What became of one descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainOutcome {
    /// The request ran; its status byte is written.
    Done {
        /// The request type.
        request_type: RequestType,
        /// The result (status, bytes moved).
        completion: Completion,
    },
    /// The request was refused; `fault.status()` is written in its status byte.
    Rejected {
        /// Why.
        fault: Fault,
    },
    /// There is no status byte to answer in: the device must set NEEDS_RESET and stop
    /// processing the queue. Nothing may be added to the used ring for this chain.
    NeedsReset {
        /// Why.
        fault: Fault,
    },
}

impl ChainOutcome {
    /// The length to put in the used ring (`None` for [`ChainOutcome::NeedsReset`]).
    pub fn used_len(&self) -> Option<u32> {
        match self {
            Self::Done { completion, .. } => Some(completion.used_len()),
            Self::Rejected { .. } => Some(1),
            Self::NeedsReset { .. } => None,
        }
    }

    /// Adds this outcome to the queue's counters.
    pub fn count(&self, m: &QueueMetrics) {
        match self {
            Self::Done {
                request_type,
                completion,
            } => {
                match request_type {
                    RequestType::In => m.req_in.inc(),
                    RequestType::Out => m.req_out.inc(),
                    RequestType::Flush => m.req_flush.inc(),
                    RequestType::GetId => m.req_get_id.inc(),
                    RequestType::Discard => m.req_discard.inc(),
                    RequestType::WriteZeroes => m.req_write_zeroes.inc(),
                    RequestType::Unsupported(_) => m.req_unsupported.inc(),
                }
                m.bytes_read.add(completion.bytes_read);
                m.bytes_written.add(completion.bytes_written);
            }
            Self::Rejected { fault } | Self::NeedsReset { fault } => {
                if fault.is_malformed() {
                    m.malformed_chains.inc();
                } else {
                    m.req_unsupported.inc();
                }
            }
        }
    }
}

/// Parses, executes and answers one chain: the whole per-request path, independent of
/// workers and transports. The caller adds the used entry ([`ChainOutcome::used_len`]).
pub fn process_chain<C, M>(
    backend: &mut BlockBackend,
    chain: DescriptorChain<C>,
    mem: &M,
    limits: &RequestLimits,
) -> ChainOutcome
where
    C: Deref,
    C::Target: GuestMemory,
    M: GuestMemory + ?Sized,
{
    match Request::parse(chain, mem, limits) {
        Ok(req) => {
            let completion = backend.execute(&req, mem);
            if mem.write_obj(completion.status, req.status_addr).is_err() {
                return ChainOutcome::NeedsReset {
                    fault: Fault::StatusOutOfMemory,
                };
            }
            ChainOutcome::Done {
                request_type: req.request_type,
                completion,
            }
        }
        Err(ParseError::Rejected { status_addr, fault }) => {
            if mem.write_obj(fault.status(), status_addr).is_err() {
                return ChainOutcome::NeedsReset {
                    fault: Fault::StatusOutOfMemory,
                };
            }
            ChainOutcome::Rejected { fault }
        }
        Err(ParseError::NoStatus(fault)) => ChainOutcome::NeedsReset { fault },
    }
}

/// A virtio-blk device.
pub struct Block {
    config: BlockConfig,
    disk: Arc<DiskFile>,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    config_space: [u8; config::CONFIG_SIZE],
    metrics: Arc<[QueueMetrics]>,
    faults: Arc<FaultLog>,
    /// A backend handed back by a stopped worker, reused on the next activation.
    spare_backend: Option<BlockBackend>,
    worker: Option<WorkerHandle<BlockBackend>>,
}

impl Block {
    /// Opens the disk.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        if config.queues == 0 || config.queues > config::MAX_QUEUES {
            return Err(BlockError::Config(format!(
                "queues={} (must be 1..={})",
                config.queues,
                config::MAX_QUEUES
            )));
        }
        let id = config.id.as_deref().unwrap_or("");
        let disk = Arc::new(DiskFile::open(
            &config.path,
            config.readonly,
            config.direct,
            id,
        )?);
        let queues = config.queues;
        Ok(Self {
            queue_sizes: vec![config::QUEUE_SIZE; usize::from(queues)],
            avail_features: config::features(config.readonly, queues),
            config_space: config::config_space(disk.capacity_sectors(), queues),
            metrics: (0..queues).map(|_| QueueMetrics::default()).collect(),
            faults: Arc::new(FaultLog::default()),
            spare_backend: None,
            worker: None,
            disk,
            config,
        })
    }

    /// The settings the disk was opened with.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    /// The counters, typed.
    pub fn metrics_snapshot(&self) -> DeviceMetricsSnapshot {
        DeviceMetricsSnapshot {
            queues: self.metrics.iter().map(QueueMetrics::snapshot).collect(),
        }
    }

    /// Whether a worker thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| w.is_running())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::BadSetup("device is already active".into()));
        }
        let n = self.queue_sizes.len();
        if ctx.queues.len() != n || ctx.kicks.len() != n {
            return Err(ActivateError::BadSetup(format!(
                "{} queues and {} kick eventfds for a device with {n} queues",
                ctx.queues.len(),
                ctx.kicks.len()
            )));
        }
        let event_idx = ctx.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues: Vec<WorkerQueue> = ctx
            .queues
            .into_iter()
            .zip(ctx.kicks)
            .enumerate()
            .filter(|(_, (q, _))| q.ready())
            .map(|(index, (mut queue, kick))| {
                queue.set_event_idx(event_idx);
                WorkerQueue {
                    index,
                    queue,
                    kick,
                    broken: false,
                }
            })
            .collect();
        if queues.is_empty() {
            return Err(ActivateError::BadSetup("no queue is ready".into()));
        }
        let mut backend = self
            .spare_backend
            .take()
            .unwrap_or_else(|| BlockBackend::new(self.disk.clone()));
        backend.set_writeback(ctx.acked_features & (1 << VIRTIO_BLK_F_FLUSH) != 0);
        let worker = BlockWorker {
            mem: ctx.mem,
            queues,
            backend,
            limits: config::limits(self.disk.capacity_sectors()),
            interrupt: ctx.interrupt,
            metrics: self.metrics.clone(),
            faults: self.faults.clone(),
            poll: std::time::Duration::from_micros(u64::from(self.config.poll_us)),
        };
        let epoll = worker.epoll().map_err(ActivateError::Worker)?;
        let handle = WorkerHandle::spawn("evmm-blk", move |kill| worker.run(epoll, kill))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(handle);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.spare_backend = worker.stop();
        }
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.metrics_snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

/// Writes `status` into a request's status byte (for backends that run
/// [`Request::parse`] and [`BlockBackend::execute`] separately).
pub fn complete_request<M: GuestMemory + ?Sized>(
    mem: &M,
    req: &Request,
    status: u8,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(status, req.status_addr)
}

#[cfg(test)]
mod tests;
