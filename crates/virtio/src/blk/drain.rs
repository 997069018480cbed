//! Draining one virtqueue: the EVENT_IDX loop (disable notifications, drain, enable,
//! re-check) around [`process_chain`], and the decision whether the driver wants a
//! used-buffer notification.
//!
//! It knows a [`Queue`], guest memory and a [`BlockBackend`] only: the in-VMM worker
//! (which signals an irqfd) and the vhost-user-blk backend (which signals the
//! frontend's call eventfd) both run it, and each delivers the notification its own way.

use super::backend::BlockBackend;
use super::request::RequestLimits;
use super::{process_chain, ChainOutcome, FaultLog, GuestFault};
use crate::metrics::QueueMetrics;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// What a queue is served with.
pub struct DrainContext<'a> {
    /// The virtio queue index (for logs).
    pub index: usize,
    /// Executes the requests.
    pub backend: &'a mut BlockBackend,
    /// The limits requests are checked against.
    pub limits: &'a RequestLimits,
    /// The queue's counters.
    pub metrics: &'a QueueMetrics,
    /// The device's once-per-kind fault log.
    pub faults: &'a FaultLog,
}

/// What one drain did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Drained {
    /// Used entries added.
    pub added: usize,
    /// Whether the driver wants a used-buffer notification for them (false when
    /// nothing was added, or EVENT_IDX / VRING_AVAIL_F_NO_INTERRUPT suppress it).
    pub notify: bool,
    /// A fault that leaves the queue unusable until the driver resets it (no status
    /// byte to answer in, or a broken ring). Not yet logged: the caller reports it
    /// to the [`FaultLog`] and stops serving the queue.
    pub fault: Option<GuestFault>,
}

impl Drained {
    /// Counts the notification decision in `m` (interrupts or interrupts_suppressed)
    /// when entries were added.
    pub fn count_notification(&self, m: &QueueMetrics) {
        if self.added == 0 {
            return;
        }
        if self.notify {
            m.interrupts.inc();
        } else {
            m.interrupts_suppressed.inc();
        }
    }
}

/// Serves every available chain of `queue`, with EVENT_IDX suppression: disable
/// notifications, drain, enable, and drain again if the driver added chains
/// meanwhile. Chains answered in their status byte ([`ChainOutcome::Rejected`]) are
/// logged here; a chain or ring fault stops the drain and is returned in
/// [`Drained::fault`].
pub fn drain_queue<M: GuestMemory>(queue: &mut Queue, mem: &M, ctx: DrainContext<'_>) -> Drained {
    let DrainContext {
        index,
        backend,
        limits,
        metrics: m,
        faults,
    } = ctx;
    let mut added = 0usize;
    let mut fault: Option<GuestFault> = None;

    'drain: loop {
        if let Err(e) = queue.disable_notification(mem) {
            fault = Some(GuestFault::Ring(format!(
                "cannot disable notifications: {e}"
            )));
            break;
        }
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    fault = Some(GuestFault::Ring(format!("bad available ring: {e}")));
                    break 'drain;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let outcome = process_chain(backend, chain, mem, limits);
            outcome.count(m);
            let used_len = match outcome {
                ChainOutcome::Done { completion, .. } => completion.used_len(),
                ChainOutcome::Rejected { fault: f } => {
                    faults.report(index, &GuestFault::Chain(f));
                    1
                }
                ChainOutcome::NeedsReset { fault: f } => {
                    fault = Some(GuestFault::Chain(f));
                    break 'drain;
                }
            };
            if let Err(e) = queue.add_used(mem, head, used_len) {
                fault = Some(GuestFault::Ring(format!("cannot add a used entry: {e}")));
                break 'drain;
            }
            added += 1;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                fault = Some(GuestFault::Ring(format!(
                    "cannot enable notifications: {e}"
                )));
                break;
            }
        }
    }

    let notify = added > 0
        && if queue.event_idx_enabled() {
            queue.needs_notification(mem).unwrap_or(true)
        } else {
            // Without EVENT_IDX the driver may still ask for no interrupts with
            // VRING_AVAIL_F_NO_INTERRUPT (virtio-queue does not look at it).
            !driver_asks_no_interrupt(mem, queue.avail_ring())
        };
    Drained {
        added,
        notify,
        fault,
    }
}

/// Whether the available ring's flags hold VRING_AVAIL_F_NO_INTERRUPT (read after
/// the used ring was written, as the spec orders it).
fn driver_asks_no_interrupt<M: GuestMemory>(mem: &M, avail_ring: u64) -> bool {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.read_obj::<u16>(GuestAddress(avail_ring))
        .map(|flags| flags & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
        .unwrap_or(false)
}
