//! Serving one request queue on a vring of vhost-user-backend: the vhost-user twin
//! of evmm's in-VMM worker (`evmm_virtio::blk` worker), running the same
//! [`serve_queue`] and [`complete_finished`] and reporting to the frontend's call
//! eventfd instead of an irqfd.
//!
//! Each queue has its own engine. With io_uring, the engine's completion eventfd is a
//! listener of the queue's thread ([`QueueServer::completion_fd`]): kicks submit,
//! completions answer. When the frontend stops the ring (GET_VRING_BASE), the requests
//! still in flight are waited for and answered first, so the ring base it gets back
//! leaves none of them behind.
//!
//! With polling on, a queue's thread does not go back to its epoll loop after serving:
//! it looks at the ring (with the driver's kicks off) and the engine's completions for
//! the polling window ([`evmm_virtio::poll`]), and turns kicks back on before it
//! returns. The wait until the next event tunes an adaptive window.
//!
//! # Guest faults
//!
//! A chain answered in its status byte (IOERR/UNSUPP) is logged once per kind and the
//! queue goes on. A fault with nowhere to answer (no writable status byte, a broken
//! ring) would make the in-VMM device set DEVICE_NEEDS_RESET; a vhost-user backend
//! has no device status of its own, so the queue stops being served (nothing more is
//! added to its used ring) until the frontend stops the ring (GET_VRING_BASE, which
//! QEMU sends when the guest resets the device), resets the device, or reconnects.

use evmm_virtio::blk::chain::{complete_finished, serve_queue, ServeContext};
use evmm_virtio::blk::engine::{BlockEngine, Finished};
use evmm_virtio::blk::metrics::BlockQueueMetrics;
use evmm_virtio::blk::request::{Fault, RequestLimits, RequestScratch};
use evmm_virtio::fault::FaultLog;
use evmm_virtio::poll::{
    allow_kicks, has_available, suppress_kicks, PollMetrics, PollMode, PollWindow,
};
use evmm_virtio::queue::Drained;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Windows in a row that found work before the thread goes back to its event loop
/// (after re-arming its kick itself), so that its exit event is looked at.
const FOUND_WINDOWS_PER_RETURN: u32 = 64;
use vhost_user_backend::{VringMutex, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

/// What every queue of a device shares.
pub struct QueueEnv<'a> {
    /// The limits requests are checked against.
    pub limits: &'a RequestLimits,
    /// Whether the driver negotiated VIRTIO_BLK_F_FLUSH (writes may stay in the page
    /// cache until FLUSH); without it every write is durable when it completes.
    pub writeback: bool,
    /// The queue's counters.
    pub metrics: &'a BlockQueueMetrics,
    /// The device's once-per-kind fault log.
    pub faults: &'a FaultLog,
    /// What polling did.
    pub poll_metrics: &'a PollMetrics,
}

/// A queue's polling window and when its last (idle) poll began.
struct PollState {
    window: PollWindow,
    idle_since: Option<Instant>,
}

/// A queue's engine and its list of reaped completions (kept so that a wake-up
/// allocates nothing).
struct Executor {
    engine: Box<dyn BlockEngine>,
    scratch: RequestScratch,
    finished: Vec<Finished>,
}

/// One request queue's own state: its engine, the vring it last served (to answer
/// what is in flight when the ring stops), and whether a guest fault stopped it.
pub struct QueueServer {
    index: usize,
    completion_fd: Option<RawFd>,
    executor: Mutex<Executor>,
    vring: Mutex<Option<VringMutex>>,
    stopped: AtomicBool,
    poll: Mutex<PollState>,
}

impl QueueServer {
    /// Queue `index`, executing requests with `engine`, waiting per `poll`.
    pub fn new(index: usize, engine: Box<dyn BlockEngine>, poll: PollMode) -> Self {
        Self {
            index,
            completion_fd: engine.completion_fd(),
            executor: Mutex::new(Executor {
                engine,
                scratch: RequestScratch::default(),
                finished: Vec::new(),
            }),
            vring: Mutex::new(None),
            stopped: AtomicBool::new(false),
            poll: Mutex::new(PollState {
                window: PollWindow::new(poll),
                idle_since: None,
            }),
        }
    }

    /// The eventfd the engine signals on completions (none for the sync engine).
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.completion_fd
    }

    /// Whether a guest fault stopped the queue.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Serves the queue again (the frontend stopped the ring or reset the device).
    pub fn restart(&self) {
        if self.stopped.swap(false, Ordering::AcqRel) {
            log::info!("virtio-blk queue {}: served again", self.index);
        }
    }

    /// Drains `vring` (after a kick): submits every available request, answers those
    /// already done, then signals the call eventfd if the driver wants it. Returns the
    /// used entries added.
    pub fn serve(
        &self,
        vring: &VringMutex,
        mem: &Arc<GuestMemoryMmap>,
        env: &QueueEnv<'_>,
    ) -> usize {
        env.metrics.wakeups.inc();
        self.woke();
        self.drain(vring, mem, env)
    }

    /// Serves what is available (a kick, or a poll that saw it).
    fn drain(&self, vring: &VringMutex, mem: &Arc<GuestMemoryMmap>, env: &QueueEnv<'_>) -> usize {
        if self.is_stopped() {
            log::debug!(
                "virtio-blk queue {}: kick on a stopped queue ignored",
                self.index
            );
            return 0;
        }
        self.remember(vring);
        let Ok(mut exec) = self.executor.lock() else {
            log::error!("virtio-blk queue {}: engine unusable", self.index);
            return 0;
        };
        let Executor {
            engine, scratch, ..
        } = &mut *exec;
        engine.set_writeback(env.writeback);
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return 0;
        }
        // A drain that stops at its budget leaves the frontend's kicks off: serve on
        // until the ring is empty (this thread's stop signal is vhost-user-backend's
        // to watch, and a disconnect ends the connection as a whole).
        let mut added = 0;
        loop {
            let drained = serve_queue(
                state.get_queue_mut(),
                mem,
                ServeContext {
                    index: self.index,
                    engine: engine.as_mut(),
                    scratch,
                    limits: env.limits,
                    metrics: env.metrics,
                    faults: env.faults,
                },
            );
            let more = drained.more && drained.fault.is_none();
            added += self.deliver(&mut state, drained, env);
            if !more {
                return added;
            }
        }
    }

    /// Answers what the engine completed (its completion eventfd fired).
    pub fn complete(&self, vring: &VringMutex, mem: &GuestMemoryMmap, env: &QueueEnv<'_>) -> usize {
        self.woke();
        self.reap(vring, mem, env)
    }

    fn reap(&self, vring: &VringMutex, mem: &GuestMemoryMmap, env: &QueueEnv<'_>) -> usize {
        let Ok(mut exec) = self.executor.lock() else {
            return 0;
        };
        let Executor {
            engine, finished, ..
        } = &mut *exec;
        finished.clear();
        engine.reap(finished);
        self.answer(vring, mem, finished, env)
    }

    /// Waits for every request in flight and answers it on the vring last served (the
    /// frontend is stopping the ring).
    pub fn settle(&self, mem: &GuestMemoryMmap, env: &QueueEnv<'_>) -> usize {
        let Ok(mut exec) = self.executor.lock() else {
            return 0;
        };
        let Executor {
            engine, finished, ..
        } = &mut *exec;
        finished.clear();
        if engine.in_flight() == 0 {
            return 0;
        }
        log::debug!(
            "virtio-blk queue {}: waiting for {} request(s) in flight",
            self.index,
            engine.in_flight()
        );
        engine.wait_idle(finished);
        let vring = self.vring.lock().ok().and_then(|v| v.clone());
        match vring {
            Some(vring) => self.answer(&vring, mem, finished, env),
            None => 0,
        }
    }

    fn answer(
        &self,
        vring: &VringMutex,
        mem: &GuestMemoryMmap,
        finished: &mut Vec<Finished>,
        env: &QueueEnv<'_>,
    ) -> usize {
        if finished.is_empty() {
            return 0;
        }
        let mut state = vring.get_mut();
        let drained = complete_finished(state.get_queue_mut(), mem, finished, env.metrics);
        finished.clear();
        self.deliver(&mut state, drained, env)
    }

    /// The thread woke up for an event: an idle poll that ended before it tells the
    /// adaptive window how long the wait was.
    fn woke(&self) {
        if let Ok(mut p) = self.poll.lock() {
            if let Some(since) = p.idle_since.take() {
                p.window.after_wait(since.elapsed());
            }
        }
    }

    /// After serving an event: polls the ring and the engine for the window (kicks
    /// off), serving what it finds, until a window passes idle; then turns kicks back
    /// on (serving what came meanwhile) and returns to the event loop.
    pub fn poll(&self, vring: &VringMutex, mem: &Arc<GuestMemoryMmap>, env: &QueueEnv<'_>) {
        let window = match self.poll.lock() {
            Ok(mut p) => {
                if p.window.enabled() && p.window.current().is_zero() {
                    // Not polling now, but an adaptive window learns from how long the
                    // thread sleeps until the next event.
                    p.idle_since = Some(Instant::now());
                }
                p.window.current()
            }
            Err(_) => return,
        };
        if window.is_zero() || self.is_stopped() {
            return;
        }
        let mut found_windows = 0u32;
        loop {
            let started = Instant::now();
            if !self.with_ready_queue(vring, |q| suppress_kicks(q, &**mem).is_ok()) {
                return;
            }
            let found = loop {
                let available = self.with_ready_queue(vring, |q| has_available(q, &**mem));
                if available {
                    let before = self.next_avail(vring);
                    self.drain(vring, mem, env);
                    env.poll_metrics.polled_drains.inc();
                    env.poll_metrics
                        .polled_requests
                        .add(u64::from(self.next_avail(vring).wrapping_sub(before)));
                    break true;
                }
                let completions = self
                    .executor
                    .lock()
                    .map(|mut e| e.engine.has_completions())
                    .unwrap_or(false);
                if completions {
                    env.poll_metrics.polled_completions.inc();
                    self.reap(vring, mem, env);
                    break true;
                }
                if started.elapsed() >= window {
                    break false;
                }
                std::hint::spin_loop();
            };
            env.poll_metrics
                .poll_ns
                .add(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
            if found && !self.is_stopped() {
                found_windows += 1;
                if found_windows < FOUND_WINDOWS_PER_RETURN {
                    continue;
                }
            }
            // Kicks back on, and one more look: what came meanwhile is served now (the
            // drain itself ends with kicks on and looks again), so nothing waits for a
            // kick that will not come.
            let more = self.with_ready_queue(vring, |q| allow_kicks(q, &**mem).unwrap_or(false));
            if more {
                self.drain(vring, mem, env);
                if found_windows < FOUND_WINDOWS_PER_RETURN {
                    continue;
                }
            }
            if !found {
                env.poll_metrics.idle_polls.inc();
                if let Ok(mut p) = self.poll.lock() {
                    p.idle_since = Some(started);
                }
            }
            return;
        }
    }

    /// Calls `f` on the vring's queue when it is ready and enabled; false otherwise.
    fn with_ready_queue(
        &self,
        vring: &VringMutex,
        f: impl FnOnce(&mut virtio_queue::Queue) -> bool,
    ) -> bool {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return false;
        }
        f(state.get_queue_mut())
    }

    fn next_avail(&self, vring: &VringMutex) -> u16 {
        vring.get_ref().get_queue().next_avail()
    }

    fn remember(&self, vring: &VringMutex) {
        if let Ok(mut slot) = self.vring.lock() {
            if slot.is_none() {
                *slot = Some(vring.clone());
            }
        }
    }

    fn deliver(
        &self,
        state: &mut VringState,
        drained: Drained<Fault>,
        env: &QueueEnv<'_>,
    ) -> usize {
        drained.count_notification(&env.metrics.interrupts, &env.metrics.interrupts_suppressed);
        if drained.notify {
            if let Err(e) = state.signal_used_queue() {
                log::error!(
                    "virtio-blk queue {}: cannot signal the frontend: {e}",
                    self.index
                );
            }
        }
        if let Some(fault) = drained.fault {
            env.faults.report(self.index, &fault);
            self.stopped.store(true, Ordering::Release);
            evmm_virtio::guest_warn!(
                "virtio-blk queue {}: stopped after a guest fault until the frontend restarts the ring",
                self.index
            );
        }
        drained.added
    }
}
