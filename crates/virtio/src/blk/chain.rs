//! One descriptor chain through the device: parse, hand to the engine, answer in the
//! status byte ([`process_chain`]); a whole queue served that way ([`serve_queue`])
//! with the generic EVENT_IDX drain loop of [`crate::queue`]; and the requests an
//! asynchronous engine finished later put in the used ring ([`complete_finished`]).
//!
//! It knows guest memory, descriptor chains and queues only: the in-VMM worker (which
//! signals an irqfd) and the vhost-user-blk daemon (which signals the frontend's call
//! eventfd) both run it, and each delivers the interrupt its own way.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap};

use super::disk::Completion;
use super::engine::{BlockEngine, Finished, Submitted};
use super::metrics::BlockQueueMetrics;
use super::request::{Fault, ParseError, Request, RequestLimits, RequestScratch, RequestType};
use crate::fault::{FaultKind, FaultLog};
use crate::queue::{drain_queue_bounded, driver_wants_interrupt, Drained, QueueFault, Served};

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
    /// The engine has it in flight: it is answered when it completes
    /// ([`complete_finished`]).
    InFlight,
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
    /// The length to put in the used ring now (`None` for a request in flight or
    /// [`ChainOutcome::NeedsReset`]).
    pub fn used_len(&self) -> Option<u32> {
        match self {
            Self::Done { completion, .. } => Some(completion.used_len()),
            Self::Rejected { .. } => Some(1),
            Self::InFlight | Self::NeedsReset { .. } => None,
        }
    }

    /// Adds this outcome to the queue's counters (a request in flight counts when it
    /// completes).
    pub fn count(&self, m: &BlockQueueMetrics) {
        match self {
            Self::Done {
                request_type,
                completion,
            } => count_done(m, *request_type, completion),
            Self::InFlight => {}
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

fn count_done(m: &BlockQueueMetrics, request_type: RequestType, completion: &Completion) {
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

/// Parses one chain (into `scratch`) and hands it to `engine`; answers it now when the
/// engine finished it (or it was refused). The caller adds the used entry
/// ([`ChainOutcome::used_len`]).
pub fn process_chain<M>(
    engine: &mut dyn BlockEngine,
    scratch: &mut RequestScratch,
    chain: DescriptorChain<M>,
    mem: &Arc<GuestMemoryMmap>,
    limits: &RequestLimits,
) -> ChainOutcome
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    match scratch.parse(chain, &**mem, limits) {
        Ok(req) => match engine.submit(head, req, mem) {
            Submitted::InFlight => ChainOutcome::InFlight,
            Submitted::Done(completion) => {
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
        },
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
/// [`Request::parse`] and an engine separately).
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
    pub engine: &'a mut dyn BlockEngine,
    /// The queue's parse buffers.
    pub scratch: &'a mut RequestScratch,
    /// The limits requests are checked against.
    pub limits: &'a RequestLimits,
    /// The queue's counters.
    pub metrics: &'a BlockQueueMetrics,
    /// The device's once-per-kind fault log.
    pub faults: &'a FaultLog,
}

/// How many chains one drain may take, per entry of the queue: enough that a busy
/// queue is drained in one go, few enough that the thread soon looks at its stop
/// signal again however fast the driver adds.
pub const DRAIN_BUDGET_PER_ENTRY: usize = 4;

/// Serves the available chains of `queue` ([`drain_queue_bounded`] around
/// [`process_chain`], at most [`DRAIN_BUDGET_PER_ENTRY`] × its size: see
/// [`Drained::more`]), then starts what the engine queued. Chains answered in their status byte
/// ([`ChainOutcome::Rejected`]) are logged here; a chain without a status byte or a
/// ring fault stops the drain and is returned in [`Drained::fault`], not yet logged.
pub fn serve_queue(
    queue: &mut Queue,
    mem: &Arc<GuestMemoryMmap>,
    ctx: ServeContext<'_>,
) -> Drained<Fault> {
    let ServeContext {
        index,
        engine,
        scratch,
        limits,
        metrics,
        faults,
    } = ctx;
    let budget = DRAIN_BUDGET_PER_ENTRY * usize::from(queue.size()).max(1);
    let drained = drain_queue_bounded(queue, &**mem, budget, |chain| {
        let outcome = process_chain(engine, scratch, chain, mem, limits);
        outcome.count(metrics);
        match outcome {
            ChainOutcome::Done { completion, .. } => Ok(completion.used_len().into()),
            ChainOutcome::InFlight => Ok(Served::Pending),
            ChainOutcome::Rejected { fault } => {
                faults.report_chain(index, &fault);
                Ok(1.into())
            }
            ChainOutcome::NeedsReset { fault } => Err(fault),
        }
    });
    if let Err(e) = engine.start() {
        log::error!("virtio-blk queue {index}: cannot start the queued requests: {e}");
    }
    drained
}

/// Answers requests an engine finished (status byte, counters, used entry, in the
/// order given) and decides whether the driver wants an interrupt for them.
pub fn complete_finished(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    finished: &[Finished],
    metrics: &BlockQueueMetrics,
) -> Drained<Fault> {
    let mut added = 0;
    let mut fault = None;
    for f in finished {
        if mem.write_obj(f.completion.status, f.status_addr).is_err() {
            // Checked at parse time; the memory can only have changed under us.
            fault.get_or_insert(QueueFault::Chain(Fault::StatusOutOfMemory));
            continue;
        }
        count_done(metrics, f.request_type, &f.completion);
        match queue.add_used(mem, f.head, f.completion.used_len()) {
            Ok(()) => added += 1,
            Err(e) => {
                fault.get_or_insert(QueueFault::Ring(format!("cannot add a used entry: {e}")));
            }
        }
    }
    Drained {
        added,
        notify: added > 0 && driver_wants_interrupt(queue, mem),
        fault,
        blocked: false,
        more: false,
    }
}
