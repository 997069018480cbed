//! The virtio-blk worker: one thread per device, blocked in epoll on the queues' kick
//! eventfds (the eventfds KVM signals as the queues' ioeventfds), the completion
//! eventfds of the queues' engines, and a kill eventfd. This is where a disk's worker
//! waits on its kicks and its disk. With polling on ([`crate::poll`]) it first looks at
//! the available rings and the engines' completion queues for a while, with the
//! driver's kicks turned off, and sleeps only when that finds nothing.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{complete_finished, serve_queue, ServeContext};
use super::disk::DiskFile;
use super::engine::{BlockEngine, Finished};
use super::metrics::BlockQueueMetrics;
use super::request::{Fault, RequestLimits, RequestScratch};
use crate::device::ReadyQueue;
use crate::epoll::{EpollHelper, FixedToken, SlotToken};
use crate::fault::FaultLog;
use crate::interrupt::{InterruptKind, InterruptSignal};
use crate::poll::{allow_kicks, has_available, suppress_kicks, PollMetrics, PollWindow};
use crate::queue::{take_kicks, Drained};

/// Polling checks between two looks at the kill eventfd.
const CHECKS_PER_KILL_LOOK: u32 = 256;

/// How a poll ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Polled {
    /// A request or a completion was found and served.
    Found,
    /// The window passed without one.
    Idle,
    /// The kill eventfd was written.
    Kill,
}

/// The worker's one named event source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The kill eventfd.
    Kill,
}

impl FixedToken for Stop {
    const ALL: &'static [Self] = &[Stop::Kill];
}

/// What woke the worker: the kill eventfd; the kick of the queue in slot `i` of
/// [`BlockWorker::queues`] (`Indexed(i)`); or its engine's completions
/// (`Indexed(queues + i)`).
pub(crate) type Token = SlotToken<Stop>;

/// One queue the worker serves.
pub(crate) struct WorkerQueue {
    /// The queue and its kick.
    pub ready: ReadyQueue,
    /// A guest fault made the queue unusable until reset.
    pub broken: bool,
    /// Executes the queue's requests.
    pub engine: Box<dyn BlockEngine>,
    /// Where the queue's requests are parsed.
    pub scratch: RequestScratch,
    /// The last drain stopped at its budget with chains left (and the driver's kicks
    /// off): serve again before sleeping.
    pub more: bool,
}

/// Everything the worker thread owns.
pub(crate) struct BlockWorker {
    pub mem: Arc<GuestMemoryMmap>,
    /// The disk, made durable when the worker stops.
    pub disk: Arc<DiskFile>,
    pub queues: Vec<WorkerQueue>,
    pub limits: RequestLimits,
    pub interrupt: Arc<dyn InterruptSignal>,
    pub metrics: Arc<[BlockQueueMetrics]>,
    pub faults: Arc<FaultLog>,
    /// How long to poll before sleeping.
    pub poll: PollWindow,
    /// What polling did.
    pub poll_metrics: Arc<PollMetrics>,
    /// Polling checks since the kill eventfd was last looked at.
    pub checks: u32,
    /// Completions reaped and not yet answered (kept to allocate nothing per wake-up).
    pub finished: Vec<Finished>,
}

impl BlockWorker {
    /// Builds the epoll set for the queues' kicks and completions (the kill eventfd is
    /// added by `run`).
    pub fn epoll(&self) -> io::Result<EpollHelper<Token>> {
        let n = self.queues.len();
        let epoll = EpollHelper::new(2 * n + 1)?;
        for (slot, q) in self.queues.iter().enumerate() {
            epoll.add(q.ready.kick.as_raw_fd(), Token::Indexed(slot))?;
            if let Some(fd) = q.engine.completion_fd() {
                epoll.add(fd, Token::Indexed(n + slot))?;
            }
        }
        Ok(epoll)
    }

    /// The thread body: serves kicks and completions until `kill` is written, then
    /// waits for every request still in flight (the driver is resetting the device:
    /// their answers are dropped) and fdatasyncs the disk.
    pub fn run(mut self, mut epoll: EpollHelper<Token>, kill: EventFd) {
        if let Err(e) = epoll.add(kill.as_raw_fd(), Token::Fixed(Stop::Kill)) {
            log::error!("virtio-blk worker cannot watch its kill eventfd: {e}");
            return;
        }
        let n = self.queues.len();
        let mut ready = Vec::with_capacity(2 * n + 1);
        loop {
            let started = Instant::now();
            let window = self.poll.current();
            if !window.is_zero() {
                match self.poll_for(window, &kill) {
                    Polled::Found => continue,
                    Polled::Kill => break,
                    Polled::Idle => {
                        self.poll_metrics.idle_polls.inc();
                        // Kicks back on before sleeping, and one more look.
                        if self.allow_kicks_and_serve() {
                            continue;
                        }
                    }
                }
            }
            // Chains left by a drain that hit its budget: look at the kill eventfd (and
            // everything else) without sleeping, then serve them.
            let leftover = self.queues.iter().any(|q| q.more);
            let timeout = leftover.then_some(std::time::Duration::ZERO);
            if let Err(e) = epoll.wait(timeout, &mut ready) {
                log::error!("virtio-blk worker: epoll_wait failed: {e}");
                break;
            }
            self.poll.after_wait(started.elapsed());
            let mut stop = false;
            for &token in &ready {
                match token {
                    Token::Fixed(Stop::Kill) => stop = true,
                    Token::Indexed(slot) if slot < n => self.handle_kick(slot),
                    Token::Indexed(slot) => {
                        self.handle_completions(slot - n);
                    }
                }
            }
            if stop {
                break;
            }
            for slot in 0..n {
                if self.queues.get(slot).is_some_and(|q| q.more) {
                    self.process_queue(slot);
                }
            }
        }
        for q in &mut self.queues {
            q.engine.wait_idle(&mut self.finished);
        }
        self.finished.clear();
        // The device is being reset or dropped: what the guest wrote becomes durable
        // whether or not it flushed (a failed flush is remembered by the disk).
        if !self.disk.readonly() {
            if let Err(e) = self.disk.sync_data() {
                log::error!("virtio-blk: fdatasync when the device stopped failed: {e}");
            }
        }
    }

    /// Whether the queue in `slot` can be served.
    fn usable(&self, slot: usize) -> bool {
        self.queues
            .get(slot)
            .is_some_and(|q| !q.broken && q.ready.queue.ready())
    }

    /// Polls every queue's available ring and engine for up to `window` with the
    /// driver's kicks off; serves the first thing found and returns.
    fn poll_for(&mut self, window: std::time::Duration, kill: &EventFd) -> Polled {
        let started = Instant::now();
        let deadline = started + window;
        for slot in 0..self.queues.len() {
            self.suppress(slot);
        }
        let outcome = loop {
            let mut found = false;
            for slot in 0..self.queues.len() {
                if !self.usable(slot) {
                    continue;
                }
                let wq = &self.queues[slot];
                if has_available(&wq.ready.queue, &*self.mem) {
                    let before = wq.ready.queue.next_avail();
                    self.process_queue(slot);
                    let wq = &self.queues[slot];
                    self.poll_metrics.polled_drains.inc();
                    self.poll_metrics
                        .polled_requests
                        .add(u64::from(wq.ready.queue.next_avail().wrapping_sub(before)));
                    self.suppress(slot);
                    found = true;
                }
                if self.queues[slot].engine.has_completions() {
                    self.poll_metrics.polled_completions.inc();
                    self.handle_completions(slot);
                    found = true;
                }
            }
            self.checks += 1;
            if self.checks >= CHECKS_PER_KILL_LOOK {
                self.checks = 0;
                if kill.read().is_ok() {
                    break Polled::Kill;
                }
            }
            if found {
                break Polled::Found;
            }
            if Instant::now() >= deadline {
                break Polled::Idle;
            }
            std::hint::spin_loop();
        };
        self.poll_metrics
            .poll_ns
            .add(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        outcome
    }

    /// Turns the driver's kicks off for the queue in `slot` (it is being polled).
    fn suppress(&mut self, slot: usize) {
        if !self.usable(slot) {
            return;
        }
        let wq = &mut self.queues[slot];
        if let Err(e) = suppress_kicks(&mut wq.ready.queue, &*self.mem) {
            log::debug!("virtio-blk queue {}: {e}", wq.ready.index);
        }
    }

    /// Turns every queue's kicks back on; serves what was made available meanwhile.
    /// Returns whether anything was.
    fn allow_kicks_and_serve(&mut self) -> bool {
        let mut found = false;
        for slot in 0..self.queues.len() {
            if !self.usable(slot) {
                continue;
            }
            let wq = &mut self.queues[slot];
            match allow_kicks(&mut wq.ready.queue, &*self.mem) {
                Ok(true) => {
                    self.process_queue(slot);
                    found = true;
                }
                Ok(false) => {}
                Err(e) => log::debug!("virtio-blk queue {}: {e}", wq.ready.index),
            }
        }
        found
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
            limits,
            metrics,
            faults,
            ..
        } = self;
        let Some(wq) = queues.get_mut(slot) else {
            return 0;
        };
        let index = wq.ready.index;
        if wq.broken || !wq.ready.queue.ready() {
            // Nothing left to serve here: the run loop must not keep coming back.
            wq.more = false;
            return 0;
        }
        let Some(m) = metrics.get(index) else {
            return 0;
        };
        let drained = serve_queue(
            &mut wq.ready.queue,
            mem,
            ServeContext {
                index,
                engine: wq.engine.as_mut(),
                scratch: &mut wq.scratch,
                limits,
                metrics: m,
                faults,
            },
        );
        self.deliver(slot, drained)
    }

    /// Answers what the engine of `slot` completed.
    pub fn handle_completions(&mut self, slot: usize) -> usize {
        let Some(wq) = self.queues.get_mut(slot) else {
            return 0;
        };
        self.finished.clear();
        wq.engine.reap(&mut self.finished);
        if self.finished.is_empty() {
            return 0;
        }
        let Some(m) = self.metrics.get(wq.ready.index) else {
            return 0;
        };
        let drained = complete_finished(&mut wq.ready.queue, &self.mem, &self.finished, m);
        self.finished.clear();
        self.deliver(slot, drained)
    }

    /// Waits for every request of `slot` in flight and answers them (for tests, which
    /// want a request done when they look).
    #[cfg(test)]
    pub fn settle(&mut self, slot: usize) -> usize {
        let Some(wq) = self.queues.get_mut(slot) else {
            return 0;
        };
        self.finished.clear();
        wq.engine.wait_idle(&mut self.finished);
        let Some(m) = self.metrics.get(wq.ready.index) else {
            return 0;
        };
        if self.finished.is_empty() {
            return 0;
        }
        let drained = complete_finished(&mut wq.ready.queue, &self.mem, &self.finished, m);
        self.finished.clear();
        self.deliver(slot, drained)
    }

    /// Interrupts the guest for `drained` if the driver wants it, and stops the queue
    /// after a fault. Returns the used entries added.
    fn deliver(&mut self, slot: usize, drained: Drained<Fault>) -> usize {
        let Some(wq) = self.queues.get_mut(slot) else {
            return 0;
        };
        let index = wq.ready.index;
        let Some(m) = self.metrics.get(index) else {
            return 0;
        };
        wq.more = drained.more;
        drained.count_notification(&m.interrupts, &m.interrupts_suppressed);
        if drained.notify {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Vring) {
                log::error!("virtio-blk queue {index}: cannot signal the guest: {e}");
            }
        }
        if let Some(f) = drained.fault {
            self.faults.report(index, &f);
            wq.broken = true;
            self.interrupt.set_needs_reset();
        }
        drained.added
    }
}
