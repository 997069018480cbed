//! Serving one virtqueue, for every device: the EVENT_IDX loop (disable
//! notifications, drain, enable, re-check) around a per-chain answer, the decision
//! whether the driver wants a used-buffer interrupt, and reading a kick eventfd.
//!
//! It knows a [`Queue`] and guest memory only. The in-VMM block worker, the
//! vhost-user-blk daemon and evmm's vhost-user takeover run it with their own answer
//! and deliver the interrupt their own way (the irqfd, or the frontend's call eventfd).

use std::io;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::Counter;

/// A fault that leaves a queue unusable until the driver resets the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueFault<F> {
    /// A chain the device cannot answer (no place for a status, say).
    Chain(F),
    /// A broken available or used ring.
    Ring(String),
}

/// The answer to one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Done: put it in the used ring with this length.
    Used(u32),
    /// Not now (e.g. the tap cannot take a frame): leave it, and the ones after it, in
    /// the available ring and stop draining.
    Later,
    /// Taken and in progress: its used entry is added when it completes (an
    /// asynchronous block engine), not by the drain.
    Pending,
}

impl From<u32> for Served {
    fn from(len: u32) -> Self {
        Served::Used(len)
    }
}

/// What one drain did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drained<F> {
    /// Used entries added.
    pub added: usize,
    /// Whether the driver wants a used-buffer interrupt for them (false when nothing
    /// was added, or EVENT_IDX / VRING_AVAIL_F_NO_INTERRUPT suppress it).
    pub notify: bool,
    /// A fault that stopped the drain. Not yet logged: the caller reports it and stops
    /// serving the queue.
    pub fault: Option<QueueFault<F>>,
    /// A chain was answered [`Served::Later`]: the drain stopped with chains left.
    pub blocked: bool,
    /// The drain took its budget of chains ([`drain_queue_bounded`]) and stopped with
    /// the driver's notifications still off: the caller must serve the queue again
    /// (after looking at its stop signal), since no kick will come for what is left.
    pub more: bool,
}

impl<F> Drained<F> {
    /// Counts the interrupt decision (when entries were added): `interrupts` or
    /// `suppressed`. Count before signalling, so that whoever the interrupt wakes sees
    /// the counters of what it was woken for.
    pub fn count_notification(&self, interrupts: &Counter, suppressed: &Counter) {
        if self.added == 0 {
            return;
        }
        if self.notify {
            interrupts.inc();
        } else {
            suppressed.inc();
        }
    }
}

/// Serves every available chain of `queue` with `answer`, which returns what to put in
/// the used ring (or to leave the chain for later), or the fault that stops the queue
/// (the chain is then not added to the used ring). With EVENT_IDX: disable
/// notifications, drain, enable, and drain again if the driver added chains meanwhile.
pub fn drain_queue<'m, M, F>(
    queue: &mut Queue,
    mem: &'m M,
    answer: impl FnMut(DescriptorChain<&'m M>) -> Result<Served, F>,
) -> Drained<F>
where
    M: GuestMemory,
{
    drain_queue_bounded(queue, mem, usize::MAX, answer)
}

/// [`drain_queue`], taking at most `budget` chains: a driver that keeps adding chains
/// (another vCPU) cannot keep the device's thread in the drain, away from its stop
/// signal, for ever. Stopped by the budget, it returns with [`Drained::more`] set.
pub fn drain_queue_bounded<'m, M, F>(
    queue: &mut Queue,
    mem: &'m M,
    budget: usize,
    mut answer: impl FnMut(DescriptorChain<&'m M>) -> Result<Served, F>,
) -> Drained<F>
where
    M: GuestMemory,
{
    let mut added = 0usize;
    let mut taken = 0usize;
    let mut fault = None;
    let mut blocked = false;
    let mut more = false;
    'drain: loop {
        if let Err(e) = queue.disable_notification(mem) {
            fault = Some(QueueFault::Ring(format!(
                "cannot disable notifications: {e}"
            )));
            break;
        }
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    fault = Some(QueueFault::Ring(format!("bad available ring: {e}")));
                    break 'drain;
                }
            };
            let Some(chain) = chain else { break };
            if taken == budget {
                // Left for the next call: give the chain back.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                more = true;
                break 'drain;
            }
            taken += 1;
            let head = chain.head_index();
            let used_len = match answer(chain) {
                Ok(Served::Used(len)) => len,
                Ok(Served::Pending) => continue,
                Ok(Served::Later) => {
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    blocked = true;
                    break 'drain;
                }
                Err(f) => {
                    fault = Some(QueueFault::Chain(f));
                    break 'drain;
                }
            };
            if let Err(e) = queue.add_used(mem, head, used_len) {
                fault = Some(QueueFault::Ring(format!("cannot add a used entry: {e}")));
                break 'drain;
            }
            added += 1;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                fault = Some(QueueFault::Ring(format!(
                    "cannot enable notifications: {e}"
                )));
                break;
            }
        }
    }
    Drained {
        added,
        notify: added > 0 && driver_wants_interrupt(queue, mem),
        fault,
        blocked,
        more,
    }
}

/// Puts `entries` (head, length) in the used ring and publishes them with one store
/// of the used index, so that a driver never sees part of them (a frame spread over
/// several receive buffers is one such group). Notification counting of the queue is
/// left alone: decide with [`needs_interrupt_since`].
pub fn publish_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    entries: &[(u16, u32)],
) -> Result<(), String> {
    let size = queue.size();
    if size == 0 {
        return Err("queue size 0".into());
    }
    let used = queue.used_ring();
    let next = queue.next_used();
    for (i, &(head, len)) in entries.iter().enumerate() {
        if head >= size {
            return Err(format!("head {head} beyond the queue size {size}"));
        }
        let slot = u64::from(next.wrapping_add(i as u16) % size);
        let at = used
            .checked_add(4 + 8 * slot)
            .ok_or("used ring address overflows")?;
        mem.write_obj(u32::from(head), GuestAddress(at))
            .and_then(|()| mem.write_obj(len, GuestAddress(at + 4)))
            .map_err(|e| format!("cannot add a used entry: {e}"))?;
    }
    let new = next.wrapping_add(entries.len() as u16);
    fence(Ordering::Release);
    mem.write_obj(new, GuestAddress(used + 2))
        .map_err(|e| format!("cannot publish the used index: {e}"))?;
    queue.set_next_used(new);
    Ok(())
}

/// Whether the driver wants a used-buffer interrupt for the entries published since the
/// used index was `old` (EVENT_IDX's used_event, or VRING_AVAIL_F_NO_INTERRUPT).
pub fn needs_interrupt_since<M: GuestMemory>(queue: &Queue, mem: &M, old: u16) -> bool {
    let new = queue.next_used();
    if new == old {
        return false;
    }
    fence(Ordering::SeqCst);
    if queue.event_idx_enabled() {
        let at = queue.avail_ring() + 4 + 2 * u64::from(queue.size());
        let Ok(used_event) = mem.read_obj::<u16>(GuestAddress(at)) else {
            return true;
        };
        // vring_need_event: used_event lies in [old, new).
        return new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old);
    }
    mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map(|flags| flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
        .unwrap_or(true)
}

/// Whether the driver wants a used-buffer interrupt for what was just added: EVENT_IDX's
/// used_event when negotiated, else the available ring's VRING_AVAIL_F_NO_INTERRUPT
/// (which virtio-queue does not look at), read after the used ring was written as the
/// spec orders it.
pub fn driver_wants_interrupt<M: GuestMemory>(queue: &mut Queue, mem: &M) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    fence(Ordering::SeqCst);
    mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map(|flags| flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
        .unwrap_or(true)
}

/// Reads a kick eventfd: the number of kicks since the last read (several kicks
/// coalesce), or `None` when there was none.
pub fn take_kicks(kick: &EventFd) -> io::Result<Option<u64>> {
    match kick.read() {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn every_chain_is_answered_and_the_driver_asked() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        add_chain(&vq, 0, &[Desc(0x10_0000, 16, true)]);
        add_chain(&vq, 1, &[Desc(0x10_1000, 16, true)]);
        let mut q = make_queue(&vq);
        let d: Drained<()> = drain_queue(&mut q, &mem, |c| Ok(u32::from(c.head_index()).into()));
        assert_eq!((d.added, d.notify, d.fault), (2, true, None));
        assert_eq!(used_elem(&mem, 1), (1, 1));
    }

    #[test]
    fn a_fault_stops_the_drain_without_a_used_entry() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        add_chain(&vq, 0, &[Desc(0x10_0000, 16, true)]);
        add_chain(&vq, 1, &[Desc(0x10_1000, 16, true)]);
        let mut q = make_queue(&vq);
        let d = drain_queue(&mut q, &mem, |c| {
            if c.head_index() == 1 {
                Err("bad")
            } else {
                Ok(1.into())
            }
        });
        assert_eq!((d.added, d.fault), (1, Some(QueueFault::Chain("bad"))));
        assert_eq!(used_idx(&mem), 1);
    }

    #[test]
    fn no_interrupt_flag_and_event_idx_are_honoured() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        add_chain(&vq, 0, &[Desc(0x10_0000, 16, true)]);
        let mut q = make_queue(&vq);
        set_avail_flags(&vq, &mem, VRING_AVAIL_F_NO_INTERRUPT as u16);
        let d: Drained<()> = drain_queue(&mut q, &mem, |_| Ok(1.into()));
        assert_eq!((d.added, d.notify), (1, false));

        let vq = MockSplitQueue::new(&mem, QSIZE);
        let mut q = make_queue(&vq);
        q.set_event_idx(true);
        add_chain(&vq, 0, &[Desc(0x10_0000, 16, true)]);
        add_chain(&vq, 1, &[Desc(0x10_1000, 16, true)]);
        // The driver wants an interrupt only once the second entry is used.
        set_used_event(&vq, &mem, 5);
        let d: Drained<()> = drain_queue(&mut q, &mem, |_| Ok(1.into()));
        assert_eq!((d.added, d.notify), (2, false));
        // avail_event tells the driver where the device will look next.
        assert_eq!(avail_event(&mem), 2);
    }

    #[test]
    fn a_driver_that_never_stops_adding_cannot_keep_the_drain_going() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        add_chain(&vq, 0, &[Desc(0x10_0000, 16, false)]);
        let mut q = make_queue(&vq);
        q.set_event_idx(true);
        // Every answer makes another chain available, as a second vCPU would.
        let mut next = 1u16;
        let mut answer = |_c: DescriptorChain<&vm_memory::GuestMemoryMmap>| -> Result<Served, ()> {
            add_chain(&vq, next % QSIZE, &[Desc(0x10_0000, 16, false)]);
            next = next.wrapping_add(1);
            Ok(Served::Used(0))
        };
        let d = drain_queue_bounded(&mut q, &mem, 100, &mut answer);
        assert!(d.more);
        assert_eq!(d.added, 100);
        // The chain left over is served by the next call.
        let d = drain_queue_bounded(&mut q, &mem, 1, &mut answer);
        assert_eq!((d.added, d.more), (1, true));
    }

    #[test]
    fn a_chain_left_for_later_stays_available() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        add_chain(&vq, 0, &[Desc(0x10_0000, 16, false)]);
        add_chain(&vq, 1, &[Desc(0x10_1000, 16, false)]);
        let mut q = make_queue(&vq);
        let d: Drained<()> = drain_queue(&mut q, &mem, |c| {
            Ok(if c.head_index() == 0 {
                Served::Used(0)
            } else {
                Served::Later
            })
        });
        assert!(d.blocked);
        assert_eq!(d.added, 1);
        let again: Drained<()> = drain_queue(&mut q, &mem, |c| {
            assert_eq!(c.head_index(), 1);
            Ok(Served::Used(0))
        });
        assert_eq!((again.added, again.blocked), (1, false));
    }

    #[test]
    fn a_group_is_published_at_once_and_event_idx_sees_all_of_it() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let mut q = make_queue(&vq);
        q.set_event_idx(true);
        // The driver wants an interrupt once entry 1 is used.
        set_used_event(&vq, &mem, 1);
        let old = q.next_used();
        publish_used(&mut q, &mem, &[(3, 100), (4, 50), (5, 7)]).unwrap();
        assert_eq!(used_idx(&mem), 3);
        assert_eq!(used_elem(&mem, 1), (4, 50));
        assert!(needs_interrupt_since(&q, &mem, old));
        // used_event 5 lies beyond what was published: no interrupt.
        set_used_event(&vq, &mem, 5);
        let old = q.next_used();
        publish_used(&mut q, &mem, &[(6, 1)]).unwrap();
        assert!(!needs_interrupt_since(&q, &mem, old));
        assert!(publish_used(&mut q, &mem, &[(QSIZE, 1)]).is_err());
    }

    #[test]
    fn kicks_coalesce_and_none_is_none() {
        let k = EventFd::new(EFD_NONBLOCK).unwrap();
        assert_eq!(take_kicks(&k).unwrap(), None);
        k.write(1).unwrap();
        k.write(2).unwrap();
        assert_eq!(take_kicks(&k).unwrap(), Some(3));
    }
}
