//! Taking a dead backend's queues over: every pending and future request of the
//! device is answered with an error the device defines
//! ([`UserDeviceKind::fail_request`]: VIRTIO_BLK_S_IOERR for a disk), so the guest
//! sees I/O errors instead of requests that never complete.
//!
//! evmm still holds everything the backend had: the guest memory, each queue's kick
//! eventfd (which KVM keeps signalling, or the transport with `--notify exit`) and
//! the device's irqfd. A [`Takeover`] runs on a thread of its own, woken by the kick
//! eventfds like any device worker, and drains with the same loop
//! ([`crate::queue::drain_queue`]).
//!
//! Where the backend stopped: the used ring's `idx`. The takeover assumes the
//! backend completed requests in the order it took them from the available ring
//! (true of a backend that serves one request at a time; a backend that completes
//! out of order and dies with requests in flight may have some requests answered
//! twice and others never: nothing in the rings tells which). It sets both
//! `next_avail` and `next_used` to the used ring's `idx`, so every request the
//! backend had taken but not completed is answered again, with an error.
//!
//! Once, when the takeover starts, the guest is interrupted regardless: the backend
//! may have completed requests and died before it signalled them. A chain the device
//! cannot answer, or a broken ring, gets the device's usual answer to such guest
//! faults: DEVICE_NEEDS_RESET and that queue is no longer served.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device::UserDeviceKind;
use crate::device::ReadyQueue;
use crate::epoll::{EpollHelper, FixedToken, SlotToken};
use crate::interrupt::{InterruptKind, InterruptSignal};
use crate::queue::{drain_queue, take_kicks, QueueFault};
use crate::worker::{WorkerHandle, WorkerKind};

crate::counters! {
    /// What the takeover did.
    TakeoverStats => TakeoverSnapshot {
        /// Requests answered with an error.
        requests_failed,
        /// Kicks read from the queues' eventfds.
        kicks,
        /// Interrupts raised.
        interrupts,
        /// Interrupts the driver did not want.
        interrupts_suppressed,
        /// Chains that could not be answered (the queue then stopped).
        malformed_chains,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Kill,
}

impl FixedToken for Stop {
    const ALL: &'static [Self] = &[Stop::Kill];
}

type Token = SlotToken<Stop>;

struct Slot {
    q: ReadyQueue,
    broken: bool,
}

/// The takeover of a device's queues.
pub struct Takeover<K: UserDeviceKind> {
    name: String,
    kind: Arc<K>,
    mem: GuestMemoryMmap,
    slots: Vec<Slot>,
    interrupt: Arc<dyn InterruptSignal>,
    stats: Arc<TakeoverStats>,
}

impl<K: UserDeviceKind> Takeover<K> {
    /// Takes over `queues` (copies of the queues as the driver set them up), each
    /// starting where its used ring stopped.
    pub fn new(
        name: &str,
        kind: Arc<K>,
        mem: GuestMemoryMmap,
        queues: Vec<ReadyQueue>,
        interrupt: Arc<dyn InterruptSignal>,
        stats: Arc<TakeoverStats>,
    ) -> Self {
        let mut t = Takeover {
            name: name.to_string(),
            kind,
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
        crate::guest_warn!(
            "{} queue {queue}: {what}; the queue is stopped until the driver resets the device",
            self.name
        );
        self.stats.malformed_chains.inc();
        self.interrupt.set_needs_reset();
    }

    /// The first pass: reads any pending kicks, answers everything pending, and
    /// interrupts the guest once. Returns the number of requests answered.
    pub fn begin(&mut self) -> usize {
        for s in &self.slots {
            if let Ok(Some(n)) = take_kicks(&s.q.kick) {
                self.stats.kicks.add(n);
            }
        }
        let answered = (0..self.slots.len()).map(|slot| self.drain(slot)).sum();
        self.stats.interrupts.inc();
        if let Err(e) = self.interrupt.trigger(InterruptKind::Vring) {
            log::error!("{}: cannot signal the guest: {e}", self.name);
        }
        answered
    }

    /// Answers every available request of the queue in `slot`; returns how many.
    pub fn drain(&mut self, slot: usize) -> usize {
        let Some(s) = self.slots.get_mut(slot) else {
            return 0;
        };
        if s.broken {
            return 0;
        }
        let (mem, kind, stats) = (&self.mem, &self.kind, &self.stats);
        let index = s.q.index;
        let drained = drain_queue(&mut s.q.queue, mem, |chain| {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            kind.fail_request(&descs, mem)
                .map(|len| {
                    stats.requests_failed.inc();
                    len.into()
                })
                .map_err(|why| format!("request {head}: {why}"))
        });
        drained.count_notification(&stats.interrupts, &stats.interrupts_suppressed);
        if drained.notify {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Vring) {
                log::error!("{} queue {index}: cannot signal the guest: {e}", self.name);
            }
        }
        if let Some(f) = drained.fault {
            s.broken = true;
            let what = match f {
                QueueFault::Chain(why) | QueueFault::Ring(why) => why,
            };
            self.fault(index, &what);
        }
        drained.added
    }

    /// Runs the takeover on a thread of its own: the first pass, then every kick.
    pub fn spawn(mut self) -> io::Result<WorkerHandle<()>> {
        let mut epoll = EpollHelper::<Token>::new(self.slots.len() + 1)?;
        for (slot, s) in self.slots.iter().enumerate() {
            epoll.add(s.q.kick.as_raw_fd(), Token::Indexed(slot))?;
        }
        let interrupt = self.interrupt.clone();
        WorkerHandle::spawn_guarded(
            WorkerKind::Takeover,
            "evmm-vu-takeover",
            move || interrupt.set_needs_reset(),
            move |kill: EventFd| {
                if let Err(e) = epoll.add(kill.as_raw_fd(), Token::Fixed(Stop::Kill)) {
                    log::error!("{}: takeover cannot watch its kill eventfd: {e}", self.name);
                    return;
                }
                self.begin();
                let mut ready = Vec::with_capacity(self.slots.len() + 1);
                loop {
                    if let Err(e) = epoll.wait(None, &mut ready) {
                        log::error!("{}: takeover epoll_wait failed: {e}", self.name);
                        return;
                    }
                    for &token in &ready {
                        let slot = match token {
                            Token::Fixed(Stop::Kill) => return,
                            Token::Indexed(slot) => slot,
                        };
                        let Some(s) = self.slots.get(slot) else {
                            continue;
                        };
                        match take_kicks(&s.q.kick) {
                            Ok(Some(v)) => self.stats.kicks.add(v),
                            Ok(None) => continue,
                            Err(e) => {
                                log::error!(
                                    "{} queue {}: cannot read kick: {e}",
                                    self.name,
                                    s.q.index
                                );
                                continue;
                            }
                        }
                        self.drain(slot);
                    }
                }
            },
        )
    }
}

#[cfg(test)]
mod tests;
