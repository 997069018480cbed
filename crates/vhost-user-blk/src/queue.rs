//! Serving one request queue on a vring of vhost-user-backend: the vhost-user twin
//! of evmm's in-VMM worker (`evmm_virtio::blk` worker), running the same
//! [`serve_queue`] and reporting to the frontend's call eventfd instead of an irqfd.
//!
//! # Guest faults
//!
//! A chain answered in its status byte (IOERR/UNSUPP) is logged once per kind and the
//! queue goes on. A fault with nowhere to answer (no writable status byte, a broken
//! ring) would make the in-VMM device set DEVICE_NEEDS_RESET; a vhost-user backend
//! has no device status of its own, so the queue stops being served (nothing more is
//! added to its used ring) until the frontend stops the ring (GET_VRING_BASE, which
//! QEMU sends when the guest resets the device), resets the device, or reconnects.

use evmm_virtio::blk::backend::BlockBackend;
use evmm_virtio::blk::chain::{serve_queue, ServeContext};
use evmm_virtio::blk::metrics::BlockQueueMetrics;
use evmm_virtio::blk::request::RequestLimits;
use evmm_virtio::fault::FaultLog;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vhost_user_backend::{VringMutex, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

/// What every queue of a device shares.
pub struct QueueEnv<'a> {
    /// The limits requests are checked against.
    pub limits: &'a RequestLimits,
    /// Whether the driver negotiated VIRTIO_BLK_F_FLUSH (writes may stay in the page
    /// cache until FLUSH); without it every write is followed by fdatasync.
    pub writeback: bool,
    /// The queue's counters.
    pub metrics: &'a BlockQueueMetrics,
    /// The device's once-per-kind fault log.
    pub faults: &'a FaultLog,
}

/// One request queue's own state: its request executor (with its bounce buffer) and
/// whether a guest fault stopped it.
pub struct QueueServer {
    index: usize,
    backend: Mutex<BlockBackend>,
    stopped: AtomicBool,
}

impl QueueServer {
    /// Queue `index`, executing requests with `backend`.
    pub fn new(index: usize, backend: BlockBackend) -> Self {
        Self {
            index,
            backend: Mutex::new(backend),
            stopped: AtomicBool::new(false),
        }
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

    /// Drains `vring` (after a kick): serves every available request, then signals
    /// the call eventfd if the driver wants it. Returns the used entries added.
    pub fn serve(&self, vring: &VringMutex, mem: &GuestMemoryMmap, env: &QueueEnv<'_>) -> usize {
        env.metrics.wakeups.inc();
        if self.is_stopped() {
            log::debug!(
                "virtio-blk queue {}: kick on a stopped queue ignored",
                self.index
            );
            return 0;
        }
        let Ok(mut backend) = self.backend.lock() else {
            log::error!("virtio-blk queue {}: request executor unusable", self.index);
            return 0;
        };
        backend.set_writeback(env.writeback);
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return 0;
        }
        let drained = serve_queue(
            state.get_queue_mut(),
            mem,
            ServeContext {
                index: self.index,
                backend: &mut backend,
                limits: env.limits,
                metrics: env.metrics,
                faults: env.faults,
            },
        );
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
            log::warn!(
                "virtio-blk queue {}: stopped after a guest fault until the frontend restarts the ring",
                self.index
            );
        }
        drained.added
    }
}
