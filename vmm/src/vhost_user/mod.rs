//! vhost-user-blk: a virtio-blk device on evmm's virtio-mmio transport whose requests
//! another process (the backend, e.g. `qemu-storage-daemon --export
//! type=vhost-user-blk`) serves, spoken to with the `vhost` crate's frontend.
//!
//! # Message sequence
//!
//! * At start-up, before the guest runs ([`VhostUserBlk::connect`]): connect,
//!   SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (MQ and
//!   CONFIG required, REPLY_ACK when offered), GET_QUEUE_NUM, GET_CONFIG. The guest
//!   is offered the backend's features without VHOST_USER_F_PROTOCOL_FEATURES,
//!   filtered by what the transport implements
//!   ([`evmm_virtio::mmio::transport_supported`]) and without SECURE_ERASE and ZONED,
//!   whose configuration fields lie beyond the 60 bytes evmm reads. Its
//!   configuration reads are answered from the GET_CONFIG copy (`num_queues` set
//!   to the queue count in use); a driver write of `writeback` is forwarded with
//!   SET_CONFIG, other configuration writes are ignored.
//! * On DRIVER_OK ([`VirtioDevice::activate`]): SET_FEATURES (the driver's features
//!   plus PROTOCOL_FEATURES), SET_MEM_TABLE (the memfd, offset, guest address, size
//!   and evmm's address of each guest RAM region), then for each ready queue
//!   SET_VRING_NUM, SET_VRING_ADDR (evmm's addresses of the rings), SET_VRING_BASE 0,
//!   SET_VRING_KICK with the queue's kick eventfd (the one KVM signals as the
//!   queue's ioeventfd, or the transport with `--notify exit`), SET_VRING_CALL with
//!   the device's irqfd, SET_VRING_ENABLE 1. From then on the backend reads kicks and
//!   writes the irqfd itself: no evmm thread is on the data path.
//! * On reset (the driver writes 0 to Status, or evmm stops): GET_VRING_BASE for each
//!   started queue, which stops the backend's rings, so the driver can set the device
//!   up again.
//!
//! # InterruptStatus
//!
//! The backend signals the guest through the irqfd directly, so evmm never learns of
//! a used-buffer interrupt. The device answers `true` to
//! [`VirtioDevice::interrupt_status_always_used`]: while it is live, InterruptStatus
//! reads with the VRING bit set (plus CONFIG when evmm raised a configuration
//! interrupt), and acknowledging VRING is harmless.
//!
//! # A backend that dies
//!
//! A monitor thread ([`monitor`]) waits for the socket to hang up (and shuts it down
//! when the backend leaves a request unanswered for [`frontend::REQUEST_TIMEOUT`]).
//! evmm then logs the loss at `error` (device, socket, reason) and, if the device is
//! live, takes its queues over ([`takeover`]): evmm still holds the kick eventfds and
//! the irqfd, so it answers every pending and future request with
//! VIRTIO_BLK_S_IOERR. The VM keeps running; a reset stops the takeover, a later
//! activation takes the queues over at once (no message is sent to a lost backend)
//! and evmm shuts down normally. A lost backend is not reconnected.

pub mod frontend;
pub mod monitor;
pub mod takeover;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use evmm_virtio::blk::config::{CONFIG_SIZE, QUEUE_SIZE};
use evmm_virtio::blk::VIRTIO_ID_BLOCK;
use evmm_virtio::device::{ActivateContext, ActivateError};
use evmm_virtio::metrics::Counter;
use evmm_virtio::mmio::transport_supported;
use evmm_virtio::worker::WorkerHandle;
use evmm_virtio::{InterruptSignal, VirtioDevice};
use serde::Serialize;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SECURE_ERASE, VIRTIO_BLK_F_ZONED,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

pub use crate::config::vhost_user::VhostUserBlkConfig;
use crate::memory::GuestMemoryMmap;
use frontend::{Connection, FrontendError, RingSetup, Watchdog, CONFIG_NUM_QUEUES};
use takeover::{Takeover, TakeoverQueue, TakeoverSnapshot, TakeoverStats};

/// Offset of `writeback` (u8) in `struct virtio_blk_config`.
const CONFIG_WRITEBACK: u64 = 32;
/// Feature bits never offered: their configuration fields are beyond what evmm reads.
const UNSUPPORTED_FEATURES: u64 = (1 << VIRTIO_BLK_F_SECURE_ERASE) | (1 << VIRTIO_BLK_F_ZONED);

/// Errors of setting a vhost-user-blk device up.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The backend cannot be reached or refused the handshake.
    #[error("--vhost-user-blk socket={}: {source}", socket.display())]
    Backend {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: FrontendError,
    },
    /// The monitor thread cannot be started.
    #[error("--vhost-user-blk socket={}: cannot start the monitor thread: {source}", socket.display())]
    Monitor {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where the backend stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Connected, handshake not done.
    Connecting,
    /// Serving the device.
    Connected,
    /// Gone: the device's requests are answered with I/O errors.
    Lost,
}

/// What a takeover needs, kept from activation until it starts.
struct TakeoverParts {
    mem: GuestMemoryMmap,
    queues: Vec<TakeoverQueue>,
    interrupt: Arc<dyn InterruptSignal>,
}

/// A live device.
struct Active {
    /// Queues whose rings the backend runs (GET_VRING_BASE on reset).
    backend_rings: Vec<usize>,
    /// Taken when a takeover starts.
    takeover: Option<TakeoverParts>,
}

struct Inner {
    conn: Connection,
    state: BackendState,
    active: Option<Active>,
    takeover: Option<WorkerHandle<()>>,
}

/// What the device, its monitor thread and the metrics share.
struct Shared {
    name: String,
    socket: PathBuf,
    watchdog: Arc<Watchdog>,
    stats: Arc<TakeoverStats>,
    activations: Counter,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backend is gone (hung up, or a request failed): say so once, shut the
    /// socket down, and take the queues over if the device is live.
    fn backend_lost(&self, inner: &mut Inner, reason: &str) {
        match inner.state {
            BackendState::Connected => log::error!(
                "{}: vhost-user backend on {} lost: {reason}; the device's requests \
                 are answered with I/O errors from now on",
                self.name,
                self.socket.display()
            ),
            // The handshake fails and reports it.
            BackendState::Connecting => log::debug!("{}: {reason}", self.name),
            BackendState::Lost => {}
        }
        inner.state = BackendState::Lost;
        inner.conn.shutdown();
        self.start_takeover(inner);
    }

    fn start_takeover(&self, inner: &mut Inner) {
        if inner.takeover.is_some() {
            return;
        }
        let Some(active) = inner.active.as_mut() else {
            return;
        };
        active.backend_rings.clear();
        let Some(parts) = active.takeover.take() else {
            return;
        };
        let interrupt = parts.interrupt.clone();
        let t = Takeover::new(
            &self.name,
            parts.mem,
            parts.queues,
            parts.interrupt,
            self.stats.clone(),
        );
        match t.spawn() {
            Ok(handle) => inner.takeover = Some(handle),
            Err(e) => {
                log::error!("{}: cannot take its queues over: {e}", self.name);
                interrupt.set_needs_reset();
            }
        }
    }
}

/// The device's counters, for `--metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VhostUserBlkMetrics {
    /// The backend's socket.
    pub socket: String,
    /// Where the backend stands.
    pub backend: BackendState,
    /// Request queues.
    pub queues: usize,
    /// Times the driver activated the device.
    pub activations: u64,
    /// Whether evmm is answering the device's requests itself (backend lost).
    pub taken_over: bool,
    /// What evmm answered after the backend was lost.
    pub takeover: TakeoverSnapshot,
}

/// A vhost-user-blk device.
pub struct VhostUserBlk {
    shared: Arc<Shared>,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    config_space: [u8; CONFIG_SIZE],
    monitor: Option<WorkerHandle<()>>,
}

impl VhostUserBlk {
    /// Connects to the backend of `config` and does the start-up handshake. `name`
    /// identifies the device in the log. Nothing is left running on error.
    pub fn connect(config: &VhostUserBlkConfig, name: &str) -> Result<Self, VhostUserError> {
        let socket = config.socket.clone();
        let backend_err = |source| VhostUserError::Backend {
            socket: socket.clone(),
            source,
        };
        let (conn, monitor_socket) = Connection::open(&socket).map_err(backend_err)?;
        let watchdog = Arc::new(Watchdog::default());
        let shared = Arc::new(Shared {
            name: name.to_string(),
            socket: socket.clone(),
            watchdog: watchdog.clone(),
            stats: Arc::new(TakeoverStats::default()),
            activations: Counter::default(),
            inner: Mutex::new(Inner {
                conn,
                state: BackendState::Connecting,
                active: None,
                takeover: None,
            }),
        });
        let weak = Arc::downgrade(&shared);
        let monitor = monitor::spawn(monitor_socket, watchdog.clone(), move |why| {
            if let Some(shared) = weak.upgrade() {
                let mut inner = shared.lock();
                shared.backend_lost(&mut inner, &why);
            }
        })
        .map_err(|source| VhostUserError::Monitor {
            socket: socket.clone(),
            source,
        })?;
        let setup = {
            let mut inner = shared.lock();
            let info = inner.conn.handshake(&watchdog);
            info.and_then(|info| info.queue_count(config.queues).map(|q| (info, q)))
        };
        let (info, queues) = match setup {
            Ok(v) => v,
            Err(e) => {
                monitor.stop();
                return Err(backend_err(e));
            }
        };
        let mut config_space = info.config;
        if info.features & (1 << VIRTIO_BLK_F_MQ) != 0 {
            config_space[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2]
                .copy_from_slice(&queues.to_le_bytes());
        }
        let avail_features = transport_supported(info.features) & !UNSUPPORTED_FEATURES;
        {
            let mut inner = shared.lock();
            if inner.state == BackendState::Lost {
                drop(inner);
                monitor.stop();
                return Err(backend_err(FrontendError::Connect {
                    path: socket.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
                    hint: " (the backend went away during the handshake)",
                }));
            }
            inner.state = BackendState::Connected;
        }
        let dev = VhostUserBlk {
            shared,
            queue_sizes: vec![QUEUE_SIZE; usize::from(queues)],
            avail_features,
            config_space,
            monitor: Some(monitor),
        };
        log::info!(
            "{name}: vhost-user backend on {}: {} sectors, {queues} queue(s), features {:#x} \
             (offered {avail_features:#x}), protocol features {:#x}",
            socket.display(),
            dev.capacity_sectors(),
            info.features,
            info.protocol_features.bits()
        );
        Ok(dev)
    }

    /// The device's name in the log.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// The disk's capacity in 512-byte sectors, as the backend reported it.
    pub fn capacity_sectors(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.config_space[..8]);
        u64::from_le_bytes(b)
    }

    /// Number of request queues.
    pub fn queue_count(&self) -> usize {
        self.queue_sizes.len()
    }

    /// Where the backend stands.
    pub fn backend_state(&self) -> BackendState {
        self.shared.lock().state
    }

    /// Whether evmm answers the device's requests itself (the backend is lost and the
    /// device is live).
    pub fn is_taken_over(&self) -> bool {
        self.shared.lock().takeover.is_some()
    }

    /// The counters, typed.
    pub fn metrics_snapshot(&self) -> VhostUserBlkMetrics {
        let inner = self.shared.lock();
        VhostUserBlkMetrics {
            socket: self.shared.socket.display().to_string(),
            backend: inner.state,
            queues: self.queue_sizes.len(),
            activations: self.shared.activations.get(),
            taken_over: inner.takeover.is_some(),
            takeover: self.shared.stats.snapshot(),
        }
    }

    /// The queues of `ctx` the driver made ready, as the takeover would run them.
    fn takeover_queues(ctx: &ActivateContext) -> Result<Vec<TakeoverQueue>, ActivateError> {
        let event_idx = ctx.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut out = Vec::new();
        for (index, (queue, kick)) in ctx.queues.iter().zip(&ctx.kicks).enumerate() {
            if !queue.ready() {
                continue;
            }
            let mut copy = Queue::try_from(queue.state())
                .map_err(|e| ActivateError::BadSetup(format!("queue {index}: {e}")))?;
            copy.set_event_idx(event_idx);
            out.push(TakeoverQueue {
                index,
                queue: copy,
                kick: kick.try_clone().map_err(ActivateError::Worker)?,
            });
        }
        Ok(out)
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        evmm_virtio::read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is the driver's to write (with VIRTIO_BLK_F_CONFIG_WCE);
        // anything else would make some backends give up on the connection.
        let wce = self.avail_features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        let (CONFIG_WRITEBACK, [writeback], true) = (offset, data, wce) else {
            log::warn!(
                "{}: config write of {} byte(s) at {offset:#x} ignored",
                self.shared.name,
                data.len()
            );
            return;
        };
        if let Some(b) = self.config_space.get_mut(CONFIG_WRITEBACK as usize) {
            *b = *writeback;
        }
        let mut inner = self.shared.lock();
        if inner.state != BackendState::Connected {
            return;
        }
        if let Err(e) = inner
            .conn
            .set_config(&self.shared.watchdog, CONFIG_WRITEBACK as u32, data)
        {
            self.shared.backend_lost(&mut inner, &e.to_string());
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let n = self.queue_sizes.len();
        if ctx.queues.len() != n || ctx.kicks.len() != n {
            return Err(ActivateError::BadSetup(format!(
                "{} queues and {} kick eventfds for a device with {n} queues",
                ctx.queues.len(),
                ctx.kicks.len()
            )));
        }
        let Some(call) = ctx.interrupt.call_eventfd() else {
            return Err(ActivateError::BadSetup(
                "the transport has no irqfd to hand to the backend".into(),
            ));
        };
        let queues = Self::takeover_queues(&ctx)?;
        if queues.is_empty() {
            return Err(ActivateError::BadSetup("no queue is ready".into()));
        }
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        if inner.active.is_some() {
            return Err(ActivateError::BadSetup("device is already active".into()));
        }
        let rings: Vec<RingSetup<'_>> = ctx
            .queues
            .iter()
            .zip(&ctx.kicks)
            .enumerate()
            .filter(|(_, (q, _))| q.ready())
            .map(|(index, (queue, kick))| RingSetup { index, queue, kick })
            .collect();
        let started = match inner.state {
            BackendState::Connected => {
                Some(
                    inner
                        .conn
                        .start(&shared.watchdog, &ctx.mem, ctx.acked_features, &rings, call),
                )
            }
            _ => None,
        };
        if let Some(Err(e)) = &started {
            if e.is_local() {
                // Nothing was sent: the backend is fine, the setup is not.
                return Err(ActivateError::BadSetup(e.to_string()));
            }
        }
        inner.active = Some(Active {
            backend_rings: rings.iter().map(|r| r.index).collect(),
            takeover: Some(TakeoverParts {
                mem: ctx.mem.clone(),
                queues,
                interrupt: ctx.interrupt.clone(),
            }),
        });
        shared.activations.inc();
        match started {
            Some(Ok(())) => log::info!(
                "{}: backend runs {} queue(s), features {:#x}",
                shared.name,
                rings.len(),
                ctx.acked_features
            ),
            Some(Err(e)) => shared.backend_lost(&mut inner, &format!("activation: {e}")),
            None => {
                log::warn!(
                    "{}: activated with its backend lost: its requests are answered with I/O errors",
                    shared.name
                );
                shared.start_takeover(&mut inner);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        if let Some(takeover) = inner.takeover.take() {
            takeover.stop();
        }
        let Some(active) = inner.active.take() else {
            return;
        };
        if inner.state != BackendState::Connected || active.backend_rings.is_empty() {
            return;
        }
        let stopped = inner.conn.stop(&shared.watchdog, &active.backend_rings);
        match stopped {
            Ok(bases) => log::debug!(
                "{}: backend rings {:?} stopped at {bases:?}",
                shared.name,
                active.backend_rings
            ),
            Err(e) => shared.backend_lost(&mut inner, &format!("reset: {e}")),
        }
    }

    fn interrupt_status_always_used(&self) -> bool {
        true
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.metrics_snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        // Stop the rings while the monitor still guards the requests; the socket
        // closes when the last reference to it goes.
        self.reset();
        if let Some(monitor) = self.monitor.take() {
            monitor.stop();
        }
    }
}

#[cfg(test)]
mod tests;
