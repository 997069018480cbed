//! The virtio-blk worker: one thread per device, blocked in epoll on the queues' kick
//! eventfds (the eventfds KVM signals as the queues' ioeventfds) and a kill eventfd.
//! This is where a disk's worker waits on its kicks.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::backend::BlockBackend;
use super::chain::{serve_queue, ServeContext};
use super::metrics::BlockQueueMetrics;
use super::request::RequestLimits;
use crate::device::ReadyQueue;
use crate::epoll::{EpollHelper, FixedToken, SlotToken};
use crate::fault::FaultLog;
use crate::interrupt::{InterruptKind, InterruptSignal};
use crate::queue::take_kicks;

/// The worker's one named event source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The kill eventfd.
    Kill,
}

impl FixedToken for Stop {
    const ALL: &'static [Self] = &[Stop::Kill];
}

/// What woke the worker: the kill eventfd, or the kick of the queue in this slot of
/// [`BlockWorker::queues`].
pub(crate) type Token = SlotToken<Stop>;

/// One queue the worker serves.
pub(crate) struct WorkerQueue {
    /// The queue and its kick.
    pub ready: ReadyQueue,
    /// A guest fault made the queue unusable until reset.
    pub broken: bool,
}

/// Everything the worker thread owns.
pub(crate) struct BlockWorker {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<WorkerQueue>,
    pub backend: BlockBackend,
    pub limits: RequestLimits,
    pub interrupt: Arc<dyn InterruptSignal>,
    pub metrics: Arc<[BlockQueueMetrics]>,
    pub faults: Arc<FaultLog>,
    /// How long to poll for the next kick before blocking.
    pub poll: Duration,
}

impl BlockWorker {
    /// Builds the epoll set for the queues' kicks (the kill eventfd is added by `run`).
    pub fn epoll(&self) -> io::Result<EpollHelper<Token>> {
        let epoll = EpollHelper::new(self.queues.len() + 1)?;
        for (slot, q) in self.queues.iter().enumerate() {
            epoll.add(q.ready.kick.as_raw_fd(), Token::Indexed(slot))?;
        }
        Ok(epoll)
    }

    /// The thread body: serves kicks until `kill` is written; hands the backend back.
    pub fn run(mut self, mut epoll: EpollHelper<Token>, kill: EventFd) -> BlockBackend {
        if let Err(e) = epoll.add(kill.as_raw_fd(), Token::Fixed(Stop::Kill)) {
            log::error!("virtio-blk worker cannot watch its kill eventfd: {e}");
            return self.backend;
        }
        let mut ready = Vec::with_capacity(self.queues.len() + 1);
        loop {
            if let Err(e) = epoll.wait_polling(self.poll, &mut ready) {
                log::error!("virtio-blk worker: epoll_wait failed: {e}");
                return self.backend;
            }
            for &token in &ready {
                match token {
                    Token::Fixed(Stop::Kill) => return self.backend,
                    Token::Indexed(slot) => self.handle_kick(slot),
                }
            }
        }
    }

    /// Reads the kick eventfd of `slot` and drains its queue.
    fn handle_kick(&mut self, slot: usize) {
        let Some(wq) = self.queues.get(slot) else {
            return;
        };
        let index = wq.ready.index;
        match take_kicks(&wq.ready.kick) {
            Ok(Some(n)) => {
                if let Some(m) = self.metrics.get(index) {
                    m.kicks.add(n);
                    m.wakeups.inc();
                }
            }
            Ok(None) => return,
            Err(e) => {
                log::error!("virtio-blk queue {index}: cannot read kick: {e}");
                return;
            }
        }
        self.process_queue(slot);
    }

    /// Serves the queue in `slot` ([`serve_queue`]), then interrupts the guest if the
    /// driver asked for it. Returns the number of used entries added.
    pub fn process_queue(&mut self, slot: usize) -> usize {
        let Self {
            mem,
            queues,
            backend,
            limits,
            interrupt,
            metrics,
            faults,
            poll: _,
        } = self;
        let Some(wq) = queues.get_mut(slot) else {
            return 0;
        };
        let index = wq.ready.index;
        if wq.broken || !wq.ready.queue.ready() {
            return 0;
        }
        let Some(m) = metrics.get(index) else {
            return 0;
        };
        let drained = serve_queue(
            &mut wq.ready.queue,
            &*mem,
            ServeContext {
                index,
                backend,
                limits,
                metrics: m,
                faults,
            },
        );
        drained.count_notification(&m.interrupts, &m.interrupts_suppressed);
        if drained.notify {
            if let Err(e) = interrupt.trigger(InterruptKind::Vring) {
                log::error!("virtio-blk queue {index}: cannot signal the guest: {e}");
            }
        }
        if let Some(f) = drained.fault {
            faults.report(index, &f);
            wq.broken = true;
            interrupt.set_needs_reset();
        }
        drained.added
    }
}
