//! The virtio-net worker: one thread per queue pair, blocked in epoll on the receive
//! and transmit queues' kick eventfds (the eventfds KVM signals as their ioeventfds),
//! the tap, and a kill eventfd; pair 0's worker also serves the control queue. This is
//! where a network device's worker waits on its kicks.
//!
//! The tap is watched for input only while the driver has receive buffers posted (a
//! receive-queue kick says it posted more), and for output only while a frame waits
//! for room: no wake-up has nothing to do. A tap that fails (a read error other than
//! "nothing to read", the interface deleted) is logged once and counted; the worker
//! stops watching it and drops what the guest sends, and evmm keeps running.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{chain_iovecs, push_iovecs, ChainFault};
use super::ctrl::{answer, command, Control, MAX_COMMAND};
use super::metrics::NetQueueMetrics;
use super::rx::{ask_for_more_buffers, Received, Receiver};
use super::tap::TapQueue;
use super::tx::Transmitter;
use crate::device::ReadyQueue;
use crate::epoll::{EpollHelper, Events, FixedToken};
use crate::fault::FaultLog;
use crate::interrupt::{InterruptKind, InterruptSignal};
use crate::queue::{drain_queue, needs_interrupt_since, take_kicks, Drained, QueueFault, Served};

/// Frames received in one go before the worker looks at its other sources.
const RX_BUDGET: usize = 256;

/// What woke the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    Kill,
    RxKick,
    TxKick,
    CtrlKick,
    TapIn,
    TapOut,
}

impl FixedToken for Token {
    const ALL: &'static [Self] = &[
        Token::Kill,
        Token::RxKick,
        Token::TxKick,
        Token::CtrlKick,
        Token::TapIn,
        Token::TapOut,
    ];
}

/// A queue the worker serves.
pub(crate) struct WorkerQueue {
    /// The queue and its kick.
    pub ready: ReadyQueue,
    /// A guest fault made the queue unusable until reset.
    pub broken: bool,
}

impl WorkerQueue {
    pub fn new(ready: ReadyQueue) -> Self {
        Self {
            ready,
            broken: false,
        }
    }
}

/// Everything a queue pair's worker thread owns.
pub(crate) struct NetWorker<T: TapQueue> {
    pub pair: usize,
    /// The tap's name, for messages.
    pub tap_name: String,
    pub mem: GuestMemoryMmap,
    pub rx: Option<WorkerQueue>,
    pub tx: Option<WorkerQueue>,
    pub ctrl: Option<WorkerQueue>,
    pub taps: Arc<[T]>,
    pub acked: u64,
    pub receiver: Receiver,
    pub transmitter: Transmitter,
    pub interrupt: Arc<dyn InterruptSignal>,
    pub metrics: Arc<[NetQueueMetrics]>,
    pub faults: Arc<FaultLog>,
    pub poll: Duration,
}

/// The worker's run-time state.
struct State {
    epoll: EpollHelper<Token>,
    /// A second descriptor of the tap, for EPOLLOUT (one descriptor cannot be in one
    /// epoll set twice).
    tap_out: File,
    reading: bool,
    writing: bool,
    tap_failed: bool,
}

impl<T: TapQueue> NetWorker<T> {
    fn tap(&self) -> &T {
        &self.taps[self.pair]
    }

    fn m(&self) -> &NetQueueMetrics {
        &self.metrics[self.pair]
    }

    /// Builds the epoll set (the kill eventfd is added by `run`).
    pub fn epoll(&self) -> io::Result<(EpollHelper<Token>, File)> {
        let epoll = EpollHelper::new(8)?;
        for (q, token) in [
            (&self.rx, Token::RxKick),
            (&self.tx, Token::TxKick),
            (&self.ctrl, Token::CtrlKick),
        ] {
            if let Some(q) = q {
                epoll.add(q.ready.kick.as_raw_fd(), token)?;
            }
        }
        // SAFETY: dup of the tap's descriptor, owned by the new File.
        let dup = unsafe { libc::fcntl(self.tap().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a new descriptor nobody else owns.
        let tap_out = unsafe { File::from_raw_fd(dup) };
        Ok((epoll, tap_out))
    }

    /// The thread body: serves kicks and the tap until `kill` is written.
    pub fn run(mut self, epoll: EpollHelper<Token>, tap_out: File, kill: EventFd) {
        let mut st = State {
            epoll,
            tap_out,
            reading: false,
            writing: false,
            tap_failed: false,
        };
        if let Err(e) = st.epoll.add(kill.as_raw_fd(), Token::Kill) {
            log::error!(
                "virtio-net pair {}: cannot watch the kill eventfd: {e}",
                self.pair
            );
            return;
        }
        if self.rx.is_some() {
            self.watch_tap_input(&mut st, true);
            self.receive(&mut st);
        }
        let mut ready = Vec::with_capacity(8);
        loop {
            if let Err(e) = st.epoll.wait_polling(self.poll, &mut ready) {
                log::error!("virtio-net pair {}: epoll_wait failed: {e}", self.pair);
                return;
            }
            self.m().wakeups.inc();
            for &token in &ready {
                match token {
                    Token::Kill => return,
                    Token::RxKick => {
                        if self.take_kicks(token) {
                            self.watch_tap_input(&mut st, true);
                            self.receive(&mut st);
                        }
                    }
                    Token::TxKick => {
                        if self.take_kicks(token) && !st.writing {
                            self.transmit(&mut st);
                        }
                    }
                    Token::TapOut => self.transmit(&mut st),
                    Token::TapIn => self.receive(&mut st),
                    Token::CtrlKick => {
                        if self.take_kicks(token) {
                            self.control();
                        }
                    }
                }
            }
        }
    }

    /// Reads a queue's kick eventfd and counts it; whether there was a kick.
    fn take_kicks(&self, token: Token) -> bool {
        let (q, counter) = match token {
            Token::RxKick => (&self.rx, &self.m().rx_kicks),
            Token::TxKick => (&self.tx, &self.m().tx_kicks),
            _ => (&self.ctrl, &self.m().rx_kicks),
        };
        let Some(q) = q else { return false };
        match take_kicks(&q.ready.kick) {
            Ok(Some(n)) => {
                if token != Token::CtrlKick {
                    counter.add(n);
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                log::error!("virtio-net queue {}: cannot read kick: {e}", q.ready.index);
                false
            }
        }
    }

    fn watch_tap_input(&self, st: &mut State, on: bool) {
        if st.tap_failed || st.reading == on || self.rx.is_none() {
            return;
        }
        let fd = self.tap().as_raw_fd();
        let r = if on {
            st.epoll.add_events(fd, Events::IN, Token::TapIn)
        } else {
            st.epoll.remove(fd)
        };
        match r {
            Ok(()) => st.reading = on,
            Err(e) => log::error!("virtio-net pair {}: epoll on the tap: {e}", self.pair),
        }
    }

    fn watch_tap_output(&self, st: &mut State, on: bool) {
        if st.writing == on {
            return;
        }
        let fd = st.tap_out.as_raw_fd();
        let r = if on {
            st.epoll.add_events(fd, Events::OUT, Token::TapOut)
        } else {
            st.epoll.remove(fd)
        };
        match r {
            Ok(()) => st.writing = on,
            Err(e) => log::error!("virtio-net pair {}: epoll on the tap: {e}", self.pair),
        }
    }

    /// The tap failed: say so once, stop watching it.
    fn tap_failed(&self, st: &mut State, e: &io::Error) {
        self.m().tap_errors.inc();
        if st.tap_failed {
            return;
        }
        log::error!(
            "virtio-net pair {}: tap {} failed: {e}; its traffic is dropped from now on",
            self.pair,
            self.tap_name
        );
        self.watch_tap_input(st, false);
        self.watch_tap_output(st, false);
        st.tap_failed = true;
    }

    /// A fault that stops `q`: logged once per kind, NEEDS_RESET.
    fn queue_fault(
        faults: &FaultLog,
        m: &NetQueueMetrics,
        interrupt: &dyn InterruptSignal,
        q: &mut WorkerQueue,
        fault: &QueueFault<ChainFault>,
    ) {
        faults.report(q.ready.index, fault);
        m.malformed_chains.inc();
        q.broken = true;
        interrupt.set_needs_reset();
    }

    /// Receives frames while the tap has them and the driver has buffers.
    fn receive(&mut self, st: &mut State) {
        if st.tap_failed {
            return;
        }
        let Self {
            pair,
            mem,
            rx,
            taps,
            receiver,
            interrupt,
            metrics,
            faults,
            ..
        } = self;
        let Some(q) = rx.as_mut().filter(|q| !q.broken) else {
            return;
        };
        let m = &metrics[*pair];
        let tap = &taps[*pair];
        let queue = &mut q.ready.queue;
        // While buffers last, the driver's kicks are not needed (EVENT_IDX: avail_event
        // is left behind; without it, VRING_USED_F_NO_NOTIFY).
        let _ = queue.disable_notification(&*mem);
        let old = queue.next_used();
        let mut stop_reading = false;
        let mut failed = None;
        for _ in 0..RX_BUDGET {
            let wait_for_buffers = match receiver.receive(queue, mem, tap, q.ready.index, m, faults)
            {
                Received::Frame | Received::Dropped => continue,
                Received::TapEmpty => break,
                // Ask for a kick when the driver posts more, then look once more.
                Received::NoBuffers => queue.enable_notification(mem),
                Received::TooFewBuffers { posted } => ask_for_more_buffers(queue, mem, posted),
                Received::TapFailed(e) => {
                    failed = Some(e);
                    break;
                }
                Received::Fault(f) => {
                    Self::queue_fault(faults, m, interrupt.as_ref(), q, &f);
                    break;
                }
            };
            match wait_for_buffers {
                Ok(true) => continue,
                Ok(false) => {
                    stop_reading = true;
                    break;
                }
                Err(e) => {
                    let f = QueueFault::Ring(format!("cannot enable notifications: {e}"));
                    Self::queue_fault(faults, m, interrupt.as_ref(), q, &f);
                    break;
                }
            }
        }
        let queue = &q.ready.queue;
        let added = queue.next_used() != old;
        let notify = added && needs_interrupt_since(queue, &*mem, old);
        signal(interrupt.as_ref(), m, added, notify, *pair);
        if stop_reading {
            self.watch_tap_input(st, false);
        }
        if let Some(e) = failed {
            self.tap_failed(st, &e);
        }
    }

    /// Sends what the driver made available; waits for the tap when it is full.
    fn transmit(&mut self, st: &mut State) {
        let Self {
            pair,
            mem,
            tx,
            taps,
            transmitter,
            interrupt,
            metrics,
            faults,
            ..
        } = self;
        let Some(q) = tx.as_mut().filter(|q| !q.broken) else {
            return;
        };
        let m = &metrics[*pair];
        let drained: Drained<ChainFault> = if st.tap_failed {
            drop_all(&mut q.ready, mem, m)
        } else {
            transmitter.transmit(
                &mut q.ready.queue,
                mem,
                &taps[*pair],
                q.ready.index,
                m,
                faults,
            )
        };
        signal(
            interrupt.as_ref(),
            m,
            drained.added > 0,
            drained.notify,
            *pair,
        );
        if let Some(f) = &drained.fault {
            Self::queue_fault(faults, m, interrupt.as_ref(), q, f);
        }
        self.watch_tap_output(st, drained.blocked);
    }

    /// Answers every available control command.
    fn control(&mut self) {
        let Self {
            pair,
            mem,
            ctrl,
            taps,
            acked,
            interrupt,
            metrics,
            faults,
            ..
        } = self;
        let Some(q) = ctrl.as_mut().filter(|q| !q.broken) else {
            return;
        };
        let m = &metrics[*pair];
        let control = Control {
            taps,
            acked: *acked,
        };
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let drained = drain_queue(&mut q.ready.queue, &*mem, |chain| {
            let (r, w) = split_chain(chain, mem, &mut readable, &mut writable)?;
            if w == 0 {
                return Err(ChainFault::NoAck);
            }
            let mut cmd = [0u8; MAX_COMMAND];
            // SAFETY: the iovecs point into guest memory the worker holds.
            let n = unsafe { command(&readable, &mut cmd) };
            let ack = control.execute(&cmd[..n.min(r)]);
            // SAFETY: as above.
            unsafe { answer(&writable, ack) };
            m.ctrl_commands.inc();
            Ok(Served::Used(1))
        });
        signal(
            interrupt.as_ref(),
            m,
            drained.added > 0,
            drained.notify,
            *pair,
        );
        if let Some(f) = &drained.fault {
            Self::queue_fault(faults, m, interrupt.as_ref(), q, f);
        }
    }
}

/// Counts the interrupt decision when entries were `added` (before signalling, so that
/// whoever the interrupt wakes sees the counters of what it was woken for) and signals
/// the guest when it asks (`notify`).
fn signal(
    interrupt: &dyn InterruptSignal,
    m: &NetQueueMetrics,
    added: bool,
    notify: bool,
    pair: usize,
) {
    if !added {
        return;
    }
    if notify {
        m.interrupts.inc();
        if let Err(e) = interrupt.trigger(InterruptKind::Vring) {
            log::error!("virtio-net pair {pair}: cannot signal the guest: {e}");
        }
    } else {
        m.interrupts_suppressed.inc();
    }
}

/// A control chain as its device-readable part followed by its device-writable part;
/// returns the length of each.
fn split_chain<M: vm_memory::GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    readable: &mut Vec<libc::iovec>,
    writable: &mut Vec<libc::iovec>,
) -> Result<(usize, usize), ChainFault> {
    readable.clear();
    writable.clear();
    let mut descs = chain.peekable();
    let mut out = Vec::new();
    while let Some(d) = descs.next_if(|d| !d.is_write_only()) {
        out.push(d);
    }
    let rest: Vec<_> = descs.collect();
    let (mut r, mut w) = (0, 0);
    for (list, target, writable_part, total) in [
        (&out, &mut *readable, false, &mut r),
        (&rest, &mut *writable, true, &mut w),
    ] {
        for d in list.iter() {
            if d.is_write_only() != writable_part {
                return Err(ChainFault::WrongDirection);
            }
            if d.len() == 0 {
                continue;
            }
            push_iovecs(mem, d.addr(), d.len() as usize, writable_part, target)?;
            *total += d.len() as usize;
        }
    }
    if rest.last().or(out.last()).is_some_and(|d| d.has_next()) {
        return Err(ChainFault::Broken);
    }
    Ok((r, w))
}

/// With the tap failed, what the guest sends is dropped (and counted), so its ring
/// does not fill up.
fn drop_all(q: &mut ReadyQueue, mem: &GuestMemoryMmap, m: &NetQueueMetrics) -> Drained<ChainFault> {
    let mut scratch = Vec::new();
    drain_queue(&mut q.queue, mem, |chain| {
        scratch.clear();
        if chain_iovecs(chain, mem, false, &mut scratch).is_ok() {
            m.tx_dropped_tap_error.inc();
        } else {
            m.malformed_chains.inc();
        }
        Ok(Served::Used(0))
    })
}
