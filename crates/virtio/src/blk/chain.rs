//! One descriptor chain through the device: parse, execute, answer in the status byte
//! ([`process_chain`]), and a whole queue served that way ([`serve_queue`]) with the
//! generic EVENT_IDX drain loop of [`crate::queue`].
//!
//! It knows guest memory, descriptor chains and queues only: the in-VMM worker (which
//! signals an irqfd) and the vhost-user-blk daemon (which signals the frontend's call
//! eventfd) both run it, and each delivers the interrupt its own way.

use std::ops::Deref;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemory};

use super::backend::{BlockBackend, Completion};
use super::metrics::BlockQueueMetrics;
use super::request::{Fault, ParseError, Request, RequestLimits, RequestType};
use crate::fault::{FaultKind, FaultLog};
use crate::queue::{drain_queue, Drained};

impl FaultKind for Fault {
    fn kind(&self) -> u32 {
        self.index()
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
    pub fn count(&self, m: &BlockQueueMetrics) {
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

/// Writes `status` into a request's status byte (for backends that run
/// [`Request::parse`] and [`BlockBackend::execute`] separately).
pub fn complete_request<M: GuestMemory + ?Sized>(
    mem: &M,
    req: &Request,
    status: u8,
) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(status, req.status_addr)
}

/// What a queue is served with.
pub struct ServeContext<'a> {
    /// The virtio queue index (for logs).
    pub index: usize,
    /// Executes the requests.
    pub backend: &'a mut BlockBackend,
    /// The limits requests are checked against.
    pub limits: &'a RequestLimits,
    /// The queue's counters.
    pub metrics: &'a BlockQueueMetrics,
    /// The device's once-per-kind fault log.
    pub faults: &'a FaultLog,
}

/// Serves every available chain of `queue` ([`drain_queue`] around [`process_chain`]).
/// Chains answered in their status byte ([`ChainOutcome::Rejected`]) are logged here; a
/// chain without a status byte or a ring fault stops the drain and is returned in
/// [`Drained::fault`], not yet logged.
pub fn serve_queue<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    ctx: ServeContext<'_>,
) -> Drained<Fault> {
    let ServeContext {
        index,
        backend,
        limits,
        metrics,
        faults,
    } = ctx;
    drain_queue(queue, mem, |chain| {
        let outcome = process_chain(backend, chain, mem, limits);
        outcome.count(metrics);
        match outcome {
            ChainOutcome::Done { completion, .. } => Ok(completion.used_len().into()),
            ChainOutcome::Rejected { fault } => {
                faults.report_chain(index, &fault);
                Ok(1.into())
            }
            ChainOutcome::NeedsReset { fault } => Err(fault),
        }
    })
}
