//! A virtio device on evmm's transport whose requests a vhost-user backend (another
//! process, e.g. `qemu-storage-daemon --export type=vhost-user-blk`) serves. Written
//! once for every kind of device; what differs per kind is a [`UserDeviceKind`].
//!
//! # Message sequence
//!
//! * At start-up, before the guest runs ([`VhostUserDevice::connect`]): connect, and
//!   the handshake of [`Connection::handshake`] with what the kind needs. The guest is
//!   offered the backend's features without VHOST_USER_F_PROTOCOL_FEATURES, filtered
//!   by what the transport implements ([`crate::transport::mmio::transport_supported`])
//!   and by the kind. Configuration reads are answered from the kind's configuration
//!   space; a driver write the kind forwards goes to the backend with SET_CONFIG, sent
//!   by the device's control thread, other writes are ignored.
//! * On DRIVER_OK ([`VirtioDevice::activate`]): the setup is checked on the vCPU
//!   (memory shareable, rings inside it; a bad one is refused there), and the
//!   messages are sent by the device's control thread ([`super::control`]), so the
//!   vCPU goes back to the guest at once: [`frontend::start`]: SET_FEATURES (the
//!   driver's features plus PROTOCOL_FEATURES), SET_MEM_TABLE, then for each ready
//!   queue SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE 0, SET_VRING_CALL with the
//!   device's irqfd, SET_VRING_KICK with the queue's kick eventfd (the one KVM
//!   signals as the queue's ioeventfd, or the transport with `--notify exit`),
//!   SET_VRING_ENABLE 1. The call comes first: libvhost-user backends serve a ring
//!   at its kick, and a kick the guest made meanwhile is already pending. Kicks the guest makes meanwhile stay counted in the kick
//!   eventfds, which the backend reads once it has them. From then on the backend
//!   reads kicks and writes the irqfd itself: no evmm thread is on the data path.
//! * On reset (the driver writes 0 to Status, or evmm stops): an activation not yet
//!   sent is dropped, one being sent is waited for (its messages share one
//!   [`super::connection::REQUEST_TIMEOUT`]), then GET_VRING_BASE for each started
//!   queue, which stops the backend's rings, so the driver can set the device up
//!   again. The reset stays on the vCPU: the driver may set the rings up anew as soon
//!   as its write of 0 returns.
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
//! A monitor thread ([`super::monitor`]) waits for the socket to hang up (and shuts it
//! down when the backend leaves a request unanswered for
//! [`super::connection::REQUEST_TIMEOUT`]). evmm then logs the loss at `error`
//! (device, socket, reason) and, if the device is live, takes its queues over
//! ([`super::takeover`]): evmm still holds the kick eventfds and the irqfd, so it
//! answers every pending and future request with the kind's error. The VM keeps
//! running; a reset stops the takeover, a later activation takes the queues over at
//! once (no message is sent to a lost backend) and evmm shuts down normally. A lost
//! backend is not reconnected.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryMmap;

use super::connection::{BackendInfo, Connection, HandshakeNeeds, PROTOCOL_FEATURES};
use super::control::Control;
use super::monitor::{self, Loss};
use super::takeover::{Takeover, TakeoverSnapshot, TakeoverStats};
use crate::device::{ActivateContext, ActivateError, DeviceOffer, ReadyQueue, VirtioDevice};
use crate::interrupt::InterruptSignal;
use crate::metrics::Counter;
use crate::transport::mmio::transport_supported;
use crate::vhost::frontend::{self, FrontendError, RingSetup, VhostConn};
use crate::worker::WorkerHandle;

/// What differs between vhost-user devices: configuration space, features, queue
/// count, and what the takeover answers when the backend is gone.
pub trait UserDeviceKind: Send + Sync + 'static {
    /// The device's name in messages ("vhost-user-blk").
    fn name(&self) -> &'static str;
    /// The command-line option that adds the device, without `--`, for messages.
    fn option(&self) -> &'static str {
        self.name()
    }
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// The size of every queue.
    fn queue_size(&self) -> u16;
    /// What the device needs from the handshake.
    fn handshake_needs(&self) -> HandshakeNeeds;
    /// The features offered to the guest, of `backend` (already filtered to what the
    /// transport implements).
    fn guest_features(&self, backend: u64) -> u64;
    /// The number of queues: `requested`, or what the backend reports; at most the
    /// device's limit.
    fn queue_count(&self, info: &BackendInfo, requested: Option<u16>)
        -> Result<u16, FrontendError>;
    /// The configuration space the guest reads.
    fn config_space(&self, info: &BackendInfo, queues: u16) -> Vec<u8>;
    /// Whether a driver write of `len` bytes at `offset` of the configuration space
    /// is the driver's to make and goes to the backend (SET_CONFIG); `features` are
    /// those offered to the guest.
    fn forwards_config_write(&self, offset: u64, len: usize, features: u64) -> bool;
    /// The takeover's answer to a request once the backend is lost: writes the failure
    /// into the chain `descs` and returns the length for the used ring, or says why
    /// the chain has no place for it.
    fn fail_request(&self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, String>;
}

/// Errors of setting a vhost-user device up.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The backend cannot be reached or refused the handshake.
    #[error("--{kind} socket={}: {source}", socket.display())]
    Backend {
        /// The device's name.
        kind: &'static str,
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: FrontendError,
    },
    /// The monitor or control thread cannot be started.
    #[error("--{kind} socket={}: cannot start the monitor or control thread: {source}", socket.display())]
    Monitor {
        /// The device's name.
        kind: &'static str,
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
    /// Gone: the device's requests are answered with errors.
    Lost,
}

/// What a takeover needs, kept from activation until it starts.
struct TakeoverParts {
    mem: GuestMemoryMmap,
    queues: Vec<ReadyQueue>,
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
    /// Counts activations and resets: an activation job whose generation is no longer
    /// current was overtaken by a reset and sends nothing.
    generation: u64,
}

/// What the device, its monitor thread and the metrics share.
struct Shared<K: UserDeviceKind> {
    name: String,
    kind: Arc<K>,
    socket: PathBuf,
    stats: Arc<TakeoverStats>,
    activations: Counter,
    inner: Mutex<Inner>,
}

impl<K: UserDeviceKind> Shared<K> {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backend is gone (hung up, or a request failed): say so once, shut the
    /// socket down, and decide who answers the device's requests.
    ///
    /// A backend that hung up serves nothing any more: if the device is live, its
    /// queues are taken over at once, so requests in flight get I/O errors. A backend
    /// that failed a request may still be running and serving the rings it has: a
    /// takeover now would make two writers of one used ring. The device then asks for
    /// a reset (DEVICE_NEEDS_RESET), and only the rings the driver sets up after it are
    /// answered by evmm.
    fn backend_lost(&self, inner: &mut Inner, loss: Loss) {
        if inner.state == BackendState::Lost {
            return;
        }
        let was = inner.state;
        inner.state = BackendState::Lost;
        inner.conn.shutdown();
        match was {
            BackendState::Connected => log::error!(
                "{}: vhost-user backend on {} lost: {loss}; the device's requests \
                 are answered with I/O errors from {}",
                self.name,
                self.socket.display(),
                match loss {
                    Loss::HungUp => "now on",
                    Loss::Unresponsive(_) => "the driver's next reset on (it is asked for one)",
                }
            ),
            // The handshake fails and reports it.
            BackendState::Connecting | BackendState::Lost => {
                log::debug!("{}: {loss}", self.name)
            }
        }
        match loss {
            Loss::HungUp => self.start_takeover(inner),
            Loss::Unresponsive(_) => {
                if let Some(active) = inner.active.as_mut() {
                    // Nothing is sent to the backend on reset any more; the takeover
                    // starts at the next activation, on the rings set up anew.
                    active.backend_rings.clear();
                    if let Some(parts) = active.takeover.take() {
                        parts.interrupt.set_needs_reset();
                    }
                }
            }
        }
    }

    /// The control thread's part of an activation: the messages that hand the backend
    /// guest memory and the rings, unless a reset came first.
    fn start_backend(
        &self,
        generation: u64,
        mem: &GuestMemoryMmap,
        features: u64,
        ready: &[ReadyQueue],
        call: &vmm_sys_util::eventfd::EventFd,
    ) {
        let mut inner = self.lock();
        if inner.generation != generation || inner.active.is_none() {
            log::debug!(
                "{}: an activation overtaken by a reset is dropped",
                self.name
            );
            return;
        }
        if inner.state != BackendState::Connected {
            // Lost between the driver's DRIVER_OK and now: nothing is sent to it.
            self.start_takeover(&mut inner);
            return;
        }
        let rings = ring_setups(ready);
        let started = inner
            .conn
            .operation(|conn| frontend::start(conn, mem, features, &rings, call));
        match started {
            Ok(()) => {
                if let Some(active) = inner.active.as_mut() {
                    active.backend_rings = rings.iter().map(|r| r.index).collect();
                }
                log::info!(
                    "{}: backend runs {} queue(s), features {:#x}",
                    self.name,
                    rings.len(),
                    features & !PROTOCOL_FEATURES
                );
            }
            Err(e) => {
                // Some rings may have been handed over: the backend may serve them.
                if let Some(active) = inner.active.as_mut() {
                    active.backend_rings = rings.iter().map(|r| r.index).collect();
                }
                self.backend_lost(&mut inner, Loss::Unresponsive(format!("activation: {e}")))
            }
        }
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
            self.kind.clone(),
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

/// The backend's view of `ready`.
fn ring_setups(ready: &[ReadyQueue]) -> Vec<RingSetup<'_>> {
    ready
        .iter()
        .map(|r| RingSetup {
            index: r.index,
            queue: &r.queue,
            kick: &r.kick,
        })
        .collect()
}

/// The device's counters, for `--metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VhostUserMetrics {
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

/// A vhost-user device of kind `K`.
pub struct VhostUserDevice<K: UserDeviceKind> {
    shared: Arc<Shared<K>>,
    offer: DeviceOffer,
    monitor: Option<WorkerHandle<()>>,
    control: Option<Control>,
}

impl<K: UserDeviceKind> VhostUserDevice<K> {
    /// Connects to the backend on `socket` and does the start-up handshake, with
    /// `queues` request queues (`None`: what the backend reports). `name` identifies
    /// the device in the log. Nothing is left running on error.
    pub fn connect(
        kind: K,
        socket: &Path,
        queues: Option<u16>,
        name: &str,
    ) -> Result<Self, VhostUserError> {
        let kind_name = kind.option();
        let backend_err = |source| VhostUserError::Backend {
            kind: kind_name,
            socket: socket.to_path_buf(),
            source,
        };
        let (conn, monitor_socket) = Connection::open(socket).map_err(backend_err)?;
        let watchdog = conn.watchdog().clone();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            kind: Arc::new(kind),
            socket: socket.to_path_buf(),
            stats: Arc::new(TakeoverStats::default()),
            activations: Counter::default(),
            inner: Mutex::new(Inner {
                conn,
                state: BackendState::Connecting,
                active: None,
                takeover: None,
                generation: 0,
            }),
        });
        let weak = Arc::downgrade(&shared);
        let monitor = monitor::spawn(monitor_socket, watchdog, move |why| {
            if let Some(shared) = weak.upgrade() {
                let mut inner = shared.lock();
                shared.backend_lost(&mut inner, why);
            }
        })
        .map_err(|source| VhostUserError::Monitor {
            kind: kind_name,
            socket: socket.to_path_buf(),
            source,
        })?;
        let kind = shared.kind.clone();
        let setup = {
            let mut inner = shared.lock();
            let info = inner.conn.handshake(kind.handshake_needs());
            info.and_then(|info| kind.queue_count(&info, queues).map(|q| (info, q)))
        };
        let (info, queues) = match setup {
            Ok(v) => v,
            Err(e) => {
                monitor.stop();
                return Err(backend_err(e));
            }
        };
        let control = match Control::spawn(name) {
            Ok(c) => c,
            Err(source) => {
                monitor.stop();
                return Err(VhostUserError::Monitor {
                    kind: kind_name,
                    socket: socket.to_path_buf(),
                    source,
                });
            }
        };
        let config_space = kind.config_space(&info, queues);
        let avail_features = kind.guest_features(transport_supported(info.features));
        {
            let mut inner = shared.lock();
            if inner.state == BackendState::Lost {
                drop(inner);
                control.stop();
                monitor.stop();
                return Err(backend_err(FrontendError::Connect {
                    path: socket.to_path_buf(),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
                    hint: " (the backend went away during the handshake)",
                }));
            }
            inner.state = BackendState::Connected;
        }
        log::info!(
            "{name}: vhost-user backend on {}: {queues} queue(s), features {:#x} \
             (offered {avail_features:#x}), protocol features {:#x}",
            socket.display(),
            info.features,
            info.protocol_features.bits()
        );
        Ok(VhostUserDevice {
            shared,
            offer: DeviceOffer {
                device_type: kind.device_type(),
                queue_sizes: vec![kind.queue_size(); usize::from(queues)],
                avail_features,
                config_space,
            },
            monitor: Some(monitor),
            control: Some(control),
        })
    }

    /// The device's name in the log.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// The configuration space the guest reads.
    pub fn config_space(&self) -> &[u8] {
        &self.offer.config_space
    }

    /// Number of request queues.
    pub fn queue_count(&self) -> usize {
        self.offer.queue_sizes.len()
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
    pub fn metrics_snapshot(&self) -> VhostUserMetrics {
        let inner = self.shared.lock();
        VhostUserMetrics {
            socket: self.shared.socket.display().to_string(),
            backend: inner.state,
            queues: self.offer.queue_sizes.len(),
            activations: self.shared.activations.get(),
            taken_over: inner.takeover.is_some(),
            takeover: self.shared.stats.snapshot(),
        }
    }
}

impl<K: UserDeviceKind> VirtioDevice for VhostUserDevice<K> {
    fn offer(&self) -> &DeviceOffer {
        &self.offer
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if !self
            .shared
            .kind
            .forwards_config_write(offset, data.len(), self.offer.avail_features)
        {
            // Anything else would make some backends give up on the connection.
            crate::guest_warn!(
                "{}: config write of {} byte(s) at {offset:#x} ignored",
                self.shared.name,
                data.len()
            );
            return;
        }
        let (Ok(start), Ok(offset32)) = (usize::try_from(offset), u32::try_from(offset)) else {
            return;
        };
        if let Some(dst) = self
            .offer
            .config_space
            .get_mut(start..)
            .and_then(|c| c.get_mut(..data.len()))
        {
            dst.copy_from_slice(data);
        }
        // Sent by the control thread, after any activation queued before it; the
        // guest reads the value back from evmm's copy at once.
        let shared = Arc::downgrade(&self.shared);
        let data = data.to_vec();
        let job = Box::new(move || {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut inner = shared.lock();
            if inner.state != BackendState::Connected {
                return;
            }
            if let Err(e) = inner.conn.set_config(offset32, &data) {
                shared.backend_lost(&mut inner, Loss::Unresponsive(format!("SET_CONFIG: {e}")));
            }
        });
        if let Some(Err(e)) = self.control.as_ref().map(|c| c.submit(job)) {
            log::error!("{}: cannot hand SET_CONFIG over: {e}", self.shared.name);
        }
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let Some(call) = ctx.interrupt.call_eventfd() else {
            return Err(ActivateError::BadSetup(
                "the transport has no irqfd to hand to the backend".into(),
            ));
        };
        let call = call.try_clone().map_err(ActivateError::Worker)?;
        let ready = ctx.take_ready_queues(self.offer.queue_sizes.len())?;
        let takeover_queues = ready
            .iter()
            .map(ReadyQueue::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        {
            let rings = ring_setups(&ready);
            // What needs no message is checked here: a setup the backend could never
            // be given is the driver's to fix.
            frontend::check_setup(&ctx.mem, &rings, Connection::RING_ADDRESSES)
                .map_err(|e| ActivateError::BadSetup(e.to_string()))?;
        }
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        if inner.active.is_some() {
            return Err(ActivateError::BadSetup("device is already active".into()));
        }
        inner.generation += 1;
        let generation = inner.generation;
        let interrupt = ctx.interrupt.clone();
        inner.active = Some(Active {
            backend_rings: Vec::new(),
            takeover: Some(TakeoverParts {
                mem: ctx.mem.clone(),
                queues: takeover_queues,
                interrupt: ctx.interrupt.clone(),
            }),
        });
        shared.activations.inc();
        if inner.state != BackendState::Connected {
            crate::guest_warn!(
                "{}: activated with its backend lost: its requests are answered with I/O errors",
                shared.name
            );
            shared.start_takeover(&mut inner);
            return Ok(());
        }
        drop(inner);
        let features = ctx.acked_features | PROTOCOL_FEATURES;
        let job_shared = Arc::downgrade(&self.shared);
        let mem = ctx.mem;
        let submitted = self.control.as_ref().map(|control| {
            control.submit(Box::new(move || {
                if let Some(shared) = job_shared.upgrade() {
                    shared.start_backend(generation, &mem, features, &ready, &call);
                }
            }))
        });
        match submitted {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                log::error!("{}: cannot hand the activation over: {e}", self.shared.name);
                interrupt.set_needs_reset();
                Ok(())
            }
            None => Err(ActivateError::BadSetup(
                "the device is being dropped".into(),
            )),
        }
    }

    fn reset(&mut self) {
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        inner.generation += 1;
        if let Some(takeover) = inner.takeover.take() {
            takeover.stop();
        }
        let Some(active) = inner.active.take() else {
            return;
        };
        if inner.state != BackendState::Connected || active.backend_rings.is_empty() {
            return;
        }
        match inner
            .conn
            .operation(|conn| frontend::stop(conn, &active.backend_rings))
        {
            Ok(bases) => log::debug!(
                "{}: backend rings {:?} stopped at {bases:?}",
                shared.name,
                active.backend_rings
            ),
            Err(e) => shared.backend_lost(&mut inner, Loss::Unresponsive(format!("reset: {e}"))),
        }
    }

    fn interrupt_status_always_used(&self) -> bool {
        true
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.metrics_snapshot()).unwrap_or(serde_json::Value::Null)
    }
}

impl<K: UserDeviceKind> Drop for VhostUserDevice<K> {
    fn drop(&mut self) {
        // No activation is sent any more; stop the rings while the monitor still
        // guards the requests; the socket closes when the last reference to it goes.
        if let Some(control) = self.control.take() {
            control.stop();
        }
        self.reset();
        if let Some(monitor) = self.monitor.take() {
            monitor.stop();
        }
    }
}

#[cfg(test)]
mod tests;
