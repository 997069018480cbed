//! The virtio-blk worker: one thread per device, blocked in epoll on the queues' kick
//! eventfds and a kill eventfd.

use super::backend::BlockBackend;
use super::drain::{drain_queue, DrainContext};
use super::request::RequestLimits;
use super::FaultLog;
use crate::epoll::{EpollHelper, EpollToken};
use crate::interrupt::{InterruptKind, InterruptSignal};
use crate::metrics::QueueMetrics;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// What woke the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// Stop.
    Kill,
    /// The kick eventfd of the queue in this slot of [`BlockWorker::queues`].
    Queue(usize),
}

impl EpollToken for Token {
    fn to_raw(self) -> u64 {
        match self {
            Token::Kill => 0,
            Token::Queue(slot) => slot as u64 + 1,
        }
    }

    fn from_raw(raw: u64) -> Option<Self> {
        match raw {
            0 => Some(Token::Kill),
            n => usize::try_from(n - 1).ok().map(Token::Queue),
        }
    }
}

/// One queue the worker serves.
pub(crate) struct WorkerQueue {
    /// The virtio queue index (indexes the metrics).
    pub index: usize,
    /// The queue.
    pub queue: Queue,
    /// Its kick eventfd.
    pub kick: EventFd,
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
    pub metrics: Arc<[QueueMetrics]>,
    pub faults: Arc<FaultLog>,
    /// How long to poll for the next kick before blocking.
    pub poll: Duration,
}

impl BlockWorker {
    /// Builds the epoll set for the queues' kicks (the kill eventfd is added by `run`).
    pub fn epoll(&self) -> io::Result<EpollHelper<Token>> {
        let epoll = EpollHelper::new(self.queues.len() + 1)?;
        for (slot, q) in self.queues.iter().enumerate() {
            epoll.add(q.kick.as_raw_fd(), Token::Queue(slot))?;
        }
        Ok(epoll)
    }

    /// The thread body: serves kicks until `kill` is written; hands the backend back.
    pub fn run(mut self, mut epoll: EpollHelper<Token>, kill: EventFd) -> BlockBackend {
        if let Err(e) = epoll.add(kill.as_raw_fd(), Token::Kill) {
            log::error!("virtio-blk worker cannot watch its kill eventfd: {e}");
            return self.backend;
        }
        loop {
            let tokens = match epoll.wait_polling(self.poll) {
                Ok(t) => t,
                Err(e) => {
                    log::error!("virtio-blk worker: epoll_wait failed: {e}");
                    return self.backend;
                }
            };
            for token in tokens {
                match token {
                    Token::Kill => return self.backend,
                    Token::Queue(slot) => self.handle_kick(slot),
                }
            }
        }
    }

    /// Reads the kick eventfd of `slot` and drains its queue.
    fn handle_kick(&mut self, slot: usize) {
        let Some(wq) = self.queues.get(slot) else {
            return;
        };
        match wq.kick.read() {
            Ok(n) => {
                if let Some(m) = self.metrics.get(wq.index) {
                    m.kicks.add(n);
                    m.wakeups.inc();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log::error!("virtio-blk queue {}: cannot read kick: {e}", wq.index);
                return;
            }
        }
        self.process_queue(slot);
    }

    /// Drains the queue in `slot` with EVENT_IDX suppression ([`drain_queue`]), then
    /// interrupts the guest if the driver asked for it. Returns the number of used
    /// entries added.
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
        if wq.broken || !wq.queue.ready() {
            return 0;
        }
        let default_metrics = QueueMetrics::default();
        let m = metrics.get(wq.index).unwrap_or(&default_metrics);
        let drained = drain_queue(
            &mut wq.queue,
            &*mem,
            DrainContext {
                index: wq.index,
                backend,
                limits,
                metrics: m,
                faults,
            },
        );
        // Counted before the guest is signalled, so that whoever the interrupt wakes
        // sees the counters of what it was woken for.
        drained.count_notification(m);
        if drained.notify {
            if let Err(e) = interrupt.trigger(InterruptKind::Vring) {
                log::error!(
                    "virtio-blk queue {}: cannot signal the guest: {e}",
                    wq.index
                );
            }
        }
        if let Some(f) = drained.fault {
            faults.report(wq.index, &f);
            wq.broken = true;
            interrupt.set_needs_reset();
        }
        drained.added
    }
}
