//! The vhost-user backend of one frontend connection: what
//! [`vhost_user_backend::VhostUserDaemon`] calls for features, configuration space,
//! guest memory and queue events.
//!
//! A fresh [`BlkBackend`] (and daemon) is built for every connection, so nothing a
//! frontend negotiated (acknowledged features, EVENT_IDX, memory, vring state,
//! stopped queues) reaches the next one. Each queue has a worker thread of its own
//! (`queues_per_thread` maps queue i to thread i) and its own engine, so the queues
//! run in parallel on the shared disk file. An engine's completion eventfd is a
//! listener of its queue's thread ([`BlkBackend::completion_listeners`]), reported as
//! event [`BlkBackend::completion_event`].

use crate::device::{self, BlockDevice};
use crate::exit_events::ExitEvents;
use crate::queue::{QueueEnv, QueueServer};
use evmm_seccomp::ThreadKind;
use evmm_virtio::blk::config::QUEUE_SIZE;
use evmm_virtio::blk::engine;
use evmm_virtio::blk::metrics::BlockQueueMetrics;
use evmm_virtio::blk::request::RequestLimits;
use evmm_virtio::fault::FaultLog;
use evmm_virtio::poll::PollMetrics;
use evmm_virtio::vhost::shared_memory::check_memory_table;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

/// Guest memory as vhost-user-backend shares it.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The backend of one connection.
pub struct BlkBackend {
    features: u64,
    config_space: Vec<u8>,
    limits: RequestLimits,
    metrics: Arc<[BlockQueueMetrics]>,
    faults: Arc<FaultLog>,
    poll_metrics: Arc<PollMetrics>,
    queues: Vec<QueueServer>,
    mem: RwLock<Arc<GuestMemoryMmap>>,
    acked: AtomicU64,
    exit_events: ExitEvents,
}

impl BlkBackend {
    /// A backend for `device`, with no guest memory until the frontend's memory table
    /// passes [`VhostUserBackend::update_memory`]'s checks.
    pub fn new(device: &BlockDevice) -> Self {
        Self {
            features: device.features(),
            config_space: device.config_space().to_vec(),
            limits: *device.limits(),
            metrics: device.metrics().clone(),
            faults: device.faults().clone(),
            poll_metrics: device.poll_metrics().clone(),
            queues: (0..usize::from(device.queues()))
                .map(|i| {
                    QueueServer::new(
                        i,
                        engine::open(device.engine(), device.disk(), QUEUE_SIZE),
                        device.poll(),
                    )
                })
                .collect(),
            mem: RwLock::new(Arc::new(GuestMemoryMmap::new())),
            acked: AtomicU64::new(0),
            exit_events: ExitEvents::default(),
        }
    }

    /// The virtio features the frontend acknowledged (0 before SET_FEATURES and after
    /// a device reset).
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Queue `index`'s state.
    pub fn queue(&self, index: usize) -> Option<&QueueServer> {
        self.queues.get(index)
    }

    /// The exit eventfds handed to the worker threads (see [`ExitEvents`]).
    pub fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    /// The event number under which queue threads report their engine's completions
    /// (above the numbers vhost-user-backend keeps for the vrings and its own events).
    pub fn completion_event(&self) -> u16 {
        u16::try_from(self.queues.len() + 1).unwrap_or(u16::MAX)
    }

    /// For each queue whose engine completes asynchronously: (the queue's thread, the
    /// eventfd to listen on).
    pub fn completion_listeners(&self) -> Vec<(usize, std::os::unix::io::RawFd)> {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.completion_fd().map(|fd| (i, fd)))
            .collect()
    }

    /// Serves queue `index` on `vring` (a kick, or the vring just enabled), then polls
    /// it for the polling window.
    pub fn serve_queue(&self, index: usize, vring: &VringMutex) -> usize {
        self.with_queue(index, |queue, mem, env| {
            let added = queue.serve(vring, &mem, env);
            queue.poll(vring, &mem, env);
            added
        })
    }

    /// Answers what queue `index`'s engine completed, then polls it.
    pub fn complete_queue(&self, index: usize, vring: &VringMutex) -> usize {
        self.with_queue(index, |queue, mem, env| {
            let added = queue.complete(vring, &mem, env);
            queue.poll(vring, &mem, env);
            added
        })
    }

    /// Waits for what queue `index` has in flight and answers it (as when the ring
    /// stops).
    pub fn settle_queue(&self, index: usize) -> usize {
        self.with_queue(index, |queue, mem, env| queue.settle(&mem, env))
    }

    fn with_queue(
        &self,
        index: usize,
        f: impl FnOnce(&QueueServer, Arc<GuestMemoryMmap>, &QueueEnv<'_>) -> usize,
    ) -> usize {
        let Some(queue) = self.queues.get(index) else {
            log::error!("event for queue {index}, which this device does not have");
            return 0;
        };
        let Some(metrics) = self.metrics.get(index) else {
            return 0;
        };
        let mem = match self.mem.read() {
            Ok(m) => m.clone(),
            Err(_) => {
                log::error!("guest memory lock poisoned");
                return 0;
            }
        };
        let env = QueueEnv {
            limits: &self.limits,
            writeback: self.acked() & (1 << VIRTIO_BLK_F_FLUSH) != 0,
            metrics,
            faults: &self.faults,
            poll_metrics: &self.poll_metrics,
        };
        f(queue, mem, &env)
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        confine_thread(ThreadKind::DaemonFrontend);
        log::debug!("frontend acknowledged features {features:#x}");
        self.acked.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        device::protocol_features()
    }

    fn reset_device(&self) {
        confine_thread(ThreadKind::DaemonFrontend);
        log::debug!("device reset");
        self.acked.store(0, Ordering::Release);
        for q in &self.queues {
            q.restart();
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        confine_thread(ThreadKind::DaemonFrontend);
        // vhost-user-backend sets it on the queues themselves.
        log::debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        confine_thread(ThreadKind::DaemonFrontend);
        let data = device::read_config(&self.config_space, offset, size);
        if data.len() != size as usize {
            evmm_virtio::guest_warn!("GET_CONFIG offset {offset} size {size} refused");
        }
        data
    }

    /// No field of this device's configuration space is writable (CONFIG_WCE is not
    /// offered), so a write is ignored, as the virtio spec has devices do with
    /// read-only fields. It is acknowledged: an error would make vhost's request
    /// handler drop the whole connection.
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        confine_thread(ThreadKind::DaemonFrontend);
        evmm_virtio::guest_warn!(
            "SET_CONFIG offset {offset} size {} ignored: the configuration space is read-only",
            buf.len()
        );
        Ok(())
    }

    /// SET_MEM_TABLE, after vhost-user-backend mapped the frontend's regions. The queues
    /// use the new table only if every region's file holds the whole region and is sealed
    /// against shrinking: otherwise the first access past the end of a file the frontend
    /// shortened would kill the daemon with SIGBUS. A refused table is answered with an
    /// error, which ends the connection; the queues never see it.
    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        confine_thread(ThreadKind::DaemonFrontend);
        let table = mem.memory().into_inner();
        if let Err((at, e)) = check_memory_table(&table) {
            log::warn!(
                "memory table refused: region at guest address {:#x}: {e}",
                at.0
            );
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
        }
        let mut slot = self
            .mem
            .write()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?;
        *slot = table;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.create()
    }

    /// GET_VRING_BASE stops the ring: the requests still in flight are waited for and
    /// answered, and a queue stopped by a guest fault is served again when the
    /// frontend starts it anew.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        confine_thread(ThreadKind::DaemonFrontend);
        if let Ok(index) = usize::try_from(queue_index) {
            self.settle_queue(index);
            if let Some(q) = self.queues.get(index) {
                q.restart();
            }
        }
        Ok(())
    }

    /// Thread `thread_id` serves queue `thread_id` alone, so `vrings` holds that one
    /// vring. Guest faults are handled (and logged) in the queue: an error here would
    /// end the worker thread.
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex],
        thread_id: usize,
    ) -> io::Result<()> {
        confine_thread(ThreadKind::DaemonQueue);
        if !evset.contains(EventSet::IN) {
            log::debug!("queue {thread_id}: event set {evset:?} ignored");
            return Ok(());
        }
        if device_event == self.completion_event() {
            // The thread's own vrings: queue `thread_id` alone.
            match vrings.first() {
                Some(vring) => {
                    self.complete_queue(thread_id, vring);
                }
                None => log::warn!("completions for queue {thread_id}, which has no vring"),
            }
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => {
                self.serve_queue(thread_id, vring);
            }
            None => log::warn!("queue {thread_id}: unknown event {device_event} ignored"),
        }
        Ok(())
    }
}

/// Narrows a thread vhost-user-backend started (the protocol thread, a queue's
/// thread) to its own seccomp filter the first time it calls into the backend; until
/// then it has the daemon's main filter, which it inherited.
fn confine_thread(kind: ThreadKind) {
    if let Err(e) = evmm_seccomp::confine_once(kind) {
        log::error!("{e}");
    }
}

#[cfg(test)]
mod tests;
