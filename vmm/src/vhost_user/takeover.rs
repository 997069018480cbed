//! Taking a dead backend's queues over: every pending and future request of the
//! device is answered with VIRTIO_BLK_S_IOERR, so the guest sees I/O errors instead
//! of requests that never complete.
//!
//! evmm still holds everything the backend had: the guest memory, each queue's kick
//! eventfd (which KVM keeps signalling, or the transport with `--notify exit`) and
//! the device's irqfd. A [`Takeover`] runs on a thread of its own, woken by the kick
//! eventfds like any device worker.
//!
//! Where the backend stopped: the used ring's `idx`. The takeover assumes the
//! backend completed requests in the order it took them from the available ring
//! (true of a backend that serves one request at a time; a backend that completes
//! out of order and dies with requests in flight may have some requests answered
//! twice and others never: nothing in the rings tells which). It sets both
//! `next_avail` and `next_used` to the used ring's `idx`, so every request the
//! backend had taken but not completed is answered again, with IOERR.
//!
//! A request is answered by writing IOERR into its status byte (the last
//! descriptor, which must be device-writable), adding it to the used ring with
//! length 1 and interrupting the guest as the driver asked (EVENT_IDX's
//! `used_event`, or VRING_AVAIL_F_NO_INTERRUPT without EVENT_IDX). Once, when the
//! takeover starts, the guest is interrupted regardless: the backend may have
//! completed requests and died before it signalled them. A chain without a
//! writable status byte, or a broken ring, gets the device's usual answer to such
//! guest faults: DEVICE_NEEDS_RESET and that queue is no longer served.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use evmm_virtio::metrics::Counter;
use evmm_virtio::worker::WorkerHandle;
use evmm_virtio::{InterruptKind, InterruptSignal};
use serde::Serialize;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

/// The epoll token of the kill eventfd (queue slots are 0, 1, ...).
const KILL_TOKEN: u64 = u64::MAX;

/// A queue to take over.
pub struct TakeoverQueue {
    /// The virtio queue index.
    pub index: usize,
    /// The queue as the driver set it up (its `next_avail`/`next_used` are replaced
    /// from the used ring when the takeover starts).
    pub queue: Queue,
    /// Its kick eventfd.
    pub kick: EventFd,
}

/// What the takeover did, for `--metrics`.
#[derive(Debug, Default)]
pub struct TakeoverStats {
    /// Requests answered with VIRTIO_BLK_S_IOERR.
    pub requests_failed: Counter,
    /// Sum of the kick eventfd values read after the takeover.
    pub kicks: Counter,
    /// Used-buffer interrupts raised.
    pub interrupts: Counter,
    /// Used-buffer interrupts the driver's EVENT_IDX or NO_INTERRUPT let it skip.
    pub interrupts_suppressed: Counter,
    /// Chains without a writable status byte and broken rings.
    pub malformed_chains: Counter,
}

/// A point-in-time copy of [`TakeoverStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[allow(missing_docs)]
pub struct TakeoverSnapshot {
    pub requests_failed: u64,
    pub kicks: u64,
    pub interrupts: u64,
    pub interrupts_suppressed: u64,
    pub malformed_chains: u64,
}

impl TakeoverStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> TakeoverSnapshot {
        TakeoverSnapshot {
            requests_failed: self.requests_failed.get(),
            kicks: self.kicks.get(),
            interrupts: self.interrupts.get(),
            interrupts_suppressed: self.interrupts_suppressed.get(),
            malformed_chains: self.malformed_chains.get(),
        }
    }
}

struct Slot {
    q: TakeoverQueue,
    broken: bool,
}

/// The queues of a device whose backend is gone.
pub struct Takeover {
    name: String,
    mem: GuestMemoryMmap,
    slots: Vec<Slot>,
    interrupt: Arc<dyn InterruptSignal>,
    stats: Arc<TakeoverStats>,
}

impl Takeover {
    /// Takes `queues` over: each resumes where the used ring says the backend
    /// stopped. `name` is the device's, for the log.
    pub fn new(
        name: &str,
        mem: GuestMemoryMmap,
        queues: Vec<TakeoverQueue>,
        interrupt: Arc<dyn InterruptSignal>,
        stats: Arc<TakeoverStats>,
    ) -> Self {
        let mut t = Takeover {
            name: name.to_string(),
            mem,
            slots: Vec::with_capacity(queues.len()),
            interrupt,
            stats,
        };
        for mut q in queues {
            let broken = match q.queue.used_idx(&t.mem, Ordering::Acquire) {
                Ok(idx) => {
                    q.queue.set_next_avail(idx.0);
                    q.queue.set_next_used(idx.0);
                    log::info!(
                        "{}: queue {} taken over at used index {}",
                        t.name,
                        q.index,
                        idx.0
                    );
                    false
                }
                Err(e) => {
                    t.fault(q.index, &format!("cannot read the used ring: {e}"));
                    true
                }
            };
            t.slots.push(Slot { q, broken });
        }
        t
    }

    fn fault(&self, queue: usize, what: &str) {
        log::warn!(
            "{} queue {queue}: {what}; the queue is stopped until the driver resets the device",
            self.name
        );
        self.stats.malformed_chains.inc();
        self.interrupt.set_needs_reset();
    }

    /// The first pass: answers everything pending on every queue, then interrupts the
    /// guest once whatever the driver's suppression says. Returns the requests answered.
    pub fn begin(&mut self) -> usize {
        for s in &self.slots {
            // Kicks the backend never read are covered by this pass.
            if let Ok(n) = s.q.kick.read() {
                self.stats.kicks.add(n);
            }
        }
        let answered = (0..self.slots.len()).map(|slot| self.drain(slot)).sum();
        if let Err(e) = self.interrupt.trigger(InterruptKind::Vring) {
            log::error!("{}: cannot signal the guest: {e}", self.name);
        }
        self.stats.interrupts.inc();
        answered
    }

    /// Answers every request pending on the queue in `slot` with IOERR (EVENT_IDX:
    /// disable notifications, drain, enable, re-check) and interrupts the guest if
    /// the driver asks for it. Returns the requests answered.
    pub fn drain(&mut self, slot: usize) -> usize {
        let Some(s) = self.slots.get_mut(slot) else {
            return 0;
        };
        if s.broken {
            return 0;
        }
        let mem = &self.mem;
        let index = s.q.index;
        let queue = &mut s.q.queue;
        let mut added = 0usize;
        let mut fault: Option<String> = None;
        'drain: loop {
            if let Err(e) = queue.disable_notification(mem) {
                fault = Some(format!("cannot disable notifications: {e}"));
                break;
            }
            loop {
                let chain = match queue.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        fault = Some(format!("bad available ring: {e}"));
                        break 'drain;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let Some(status) = chain
                    .last()
                    .filter(|d| d.is_write_only() && !d.has_next() && d.len() > 0)
                else {
                    fault = Some(format!("request {head} has no writable status byte"));
                    break 'drain;
                };
                if mem
                    .write_obj(VIRTIO_BLK_S_IOERR as u8, status.addr())
                    .is_err()
                {
                    fault = Some(format!("request {head}: status byte outside guest memory"));
                    break 'drain;
                }
                if let Err(e) = queue.add_used(mem, head, 1) {
                    fault = Some(format!("cannot add a used entry: {e}"));
                    break 'drain;
                }
                self.stats.requests_failed.inc();
                added += 1;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    fault = Some(format!("cannot enable notifications: {e}"));
                    break;
                }
            }
        }
        if added > 0 {
            let notify = if queue.event_idx_enabled() {
                queue.needs_notification(mem).unwrap_or(true)
            } else {
                !driver_asks_no_interrupt(mem, queue.avail_ring())
            };
            if notify {
                if let Err(e) = self.interrupt.trigger(InterruptKind::Vring) {
                    log::error!("{} queue {index}: cannot signal the guest: {e}", self.name);
                }
                self.stats.interrupts.inc();
            } else {
                self.stats.interrupts_suppressed.inc();
            }
        }
        if let Some(f) = fault {
            if let Some(s) = self.slots.get_mut(slot) {
                s.broken = true;
            }
            self.fault(index, &f);
        }
        added
    }

    /// Starts the takeover on a thread of its own: [`Takeover::begin`], then a
    /// [`Takeover::drain`] for every kick until the handle is stopped.
    pub fn spawn(mut self) -> io::Result<WorkerHandle<()>> {
        let epoll = Epoll::new()?;
        for (slot, s) in self.slots.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                s.q.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, slot as u64),
            )?;
        }
        crate::signals::with_stop_signals_blocked(|| {
            WorkerHandle::spawn("evmm-vu-takeover", move |kill| {
                if let Err(e) = epoll.ctl(
                    ControlOperation::Add,
                    kill.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, KILL_TOKEN),
                ) {
                    log::error!("{}: takeover cannot watch its kill eventfd: {e}", self.name);
                    return;
                }
                self.begin();
                self.run(&epoll);
            })
        })
    }

    fn run(&mut self, epoll: &Epoll) {
        let mut events = vec![EpollEvent::default(); self.slots.len() + 1];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("{}: takeover epoll_wait failed: {e}", self.name);
                    return;
                }
            };
            for ev in events.iter().take(n) {
                let token = ev.data();
                if token == KILL_TOKEN {
                    return;
                }
                let Ok(slot) = usize::try_from(token) else {
                    continue;
                };
                let Some(s) = self.slots.get(slot) else {
                    continue;
                };
                match s.q.kick.read() {
                    Ok(v) => self.stats.kicks.add(v),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        log::error!("{} queue {}: cannot read kick: {e}", self.name, s.q.index);
                        continue;
                    }
                }
                self.drain(slot);
            }
        }
    }
}

/// Whether the available ring's flags hold VRING_AVAIL_F_NO_INTERRUPT (read after
/// the used ring was written, as the spec orders it).
fn driver_asks_no_interrupt(mem: &GuestMemoryMmap, avail_ring: u64) -> bool {
    std::sync::atomic::fence(Ordering::SeqCst);
    mem.read_obj::<u16>(GuestAddress(avail_ring))
        .map(|flags| flags & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests;
