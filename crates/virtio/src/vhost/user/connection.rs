//! The vhost-user conversation with a backend, on the `vhost` crate's [`Frontend`].
//!
//! * [`Connection::open`]: connect to the socket (retrying while it is refused, as a
//!   backend may be starting);
//! * [`Connection::handshake`]: SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES /
//!   SET_PROTOCOL_FEATURES (the device's required ones, REPLY_ACK used when offered:
//!   every message is then acknowledged, so a backend that refuses one is noticed at
//!   once), GET_QUEUE_NUM when MQ was agreed, GET_CONFIG when the device reads the
//!   backend's configuration space;
//! * the ring handover is [`crate::vhost::frontend`]'s, through [`VhostConn`]:
//!   SET_VRING_ENABLE starts a ring, GET_VRING_BASE stops it.
//!
//! Every request is timed by a [`Watchdog`]: the `vhost` crate blocks in `recv` until
//! the backend answers (and retries on a socket timeout), so a backend that stops
//! answering would block the calling thread for ever. The monitor thread shuts the
//! socket down when a request takes longer than [`REQUEST_TIMEOUT`], which makes the
//! blocked `recv` fail. A backend that is gone (socket closed) makes every request
//! fail at once. The requests of one operation ([`Connection::operation`]: a device's
//! activation or reset, many messages) share one such deadline, so that a slow but
//! live backend holds the calling thread (a vCPU) for one [`REQUEST_TIMEOUT`] at
//! most, not one per message.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use crate::vhost::frontend::{FrontendError, RingAddresses, VhostConn};

/// VHOST_USER_F_PROTOCOL_FEATURES, the bit of GET_FEATURES that says the backend speaks
/// the protocol-feature extension. Never offered to the guest; always acked back to
/// the backend.
pub const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// How long a request may wait for the backend's answer before the backend is
/// declared unresponsive.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a refused connection is retried (the backend may be starting).
const CONNECT_RETRIES: u32 = 5;
/// The pause between connection attempts.
const CONNECT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The request in flight, for the monitor thread's deadline check.
#[derive(Debug, Default)]
pub struct Watchdog {
    busy: Mutex<Option<(Instant, &'static str)>>,
    /// When the operation under way (if any) began: its requests are timed from there.
    operation: Mutex<Option<Instant>>,
    fired: AtomicBool,
}

impl Watchdog {
    pub(crate) fn begin(&self, request: &'static str) {
        let since = self
            .operation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(Instant::now);
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = Some((since, request));
    }

    fn set_operation(&self, start: Option<Instant>) {
        *self.operation.lock().unwrap_or_else(|e| e.into_inner()) = start;
    }

    pub(crate) fn end(&self) {
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Records that a request was overdue and the socket shut down because of it.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
    }

    /// Whether [`Watchdog::fire`] was called.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// The request that has been waiting longer than `timeout`, if any.
    pub fn overdue(&self, timeout: Duration) -> Option<&'static str> {
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.filter(|(since, _)| since.elapsed() > timeout)
            .map(|(_, request)| request)
    }
}

/// What the backend told evmm at connection time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// GET_FEATURES, as the backend answered.
    pub features: u64,
    /// The protocol features evmm acked.
    pub protocol_features: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM (1 without the MQ protocol feature).
    pub max_queues: u64,
    /// GET_CONFIG: the device's configuration space (empty when not read).
    pub config: Vec<u8>,
}

/// What a device needs from the handshake.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeNeeds {
    /// Protocol features the backend must offer.
    pub protocol_features: VhostUserProtocolFeatures,
    /// Bytes of configuration space to read with GET_CONFIG (0: none).
    pub config_size: usize,
}

/// A connection to a vhost-user backend.
pub struct Connection {
    frontend: Frontend,
    /// The same socket, for shutting it down.
    socket: UnixStream,
    path: PathBuf,
    watchdog: Arc<Watchdog>,
}

impl Connection {
    /// Connects to `path`, retrying a few times while the connection is refused.
    /// Returns the connection and a clone of its socket for the monitor thread.
    pub fn open(path: &Path) -> Result<(Self, UnixStream), FrontendError> {
        let mut attempt = 0;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        && attempt < CONNECT_RETRIES =>
                {
                    attempt += 1;
                    std::thread::sleep(CONNECT_RETRY_DELAY);
                }
                Err(source) => {
                    let hint = match source.kind() {
                        io::ErrorKind::NotFound => " (no such socket: is the backend running?)",
                        io::ErrorKind::ConnectionRefused => {
                            " (nobody listens on it: is the backend running?)"
                        }
                        _ => "",
                    };
                    return Err(FrontendError::Connect {
                        path: path.to_path_buf(),
                        source,
                        hint,
                    });
                }
            }
        };
        let connect_err = |source| FrontendError::Connect {
            path: path.to_path_buf(),
            source,
            hint: "",
        };
        let socket = stream.try_clone().map_err(connect_err)?;
        let monitor = stream.try_clone().map_err(connect_err)?;
        let conn = Connection {
            frontend: Frontend::from_stream(stream, 1),
            socket,
            path: path.to_path_buf(),
            watchdog: Arc::new(Watchdog::default()),
        };
        Ok((conn, monitor))
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The watchdog of this connection's requests.
    pub fn watchdog(&self) -> &Arc<Watchdog> {
        &self.watchdog
    }

    /// Shuts the socket down: every later request fails at once, a request blocked
    /// in `recv` returns, and the backend sees the frontend go away.
    pub fn shutdown(&self) {
        if let Err(e) = self.socket.shutdown(std::net::Shutdown::Both) {
            if e.kind() != io::ErrorKind::NotConnected {
                log::debug!("vhost-user {}: shutdown: {e}", self.path.display());
            }
        }
    }

    /// Runs `f`, whose requests share one deadline: [`REQUEST_TIMEOUT`] from now.
    pub fn operation<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.watchdog.set_operation(Some(Instant::now()));
        let r = f(self);
        self.watchdog.set_operation(None);
        r
    }

    /// Runs a request that needs the frontend mutably (the vhost-user extensions).
    fn call_mut<T>(
        &mut self,
        request: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError> {
        self.watchdog.begin(request);
        let r = f(&mut self.frontend);
        self.watchdog.end();
        r.map_err(|source| {
            if self.watchdog.fired() {
                FrontendError::NoAnswer {
                    request,
                    secs: REQUEST_TIMEOUT.as_secs(),
                }
            } else {
                FrontendError::Request { request, source }
            }
        })
    }

    /// The start-up handshake: SET_OWNER, features, protocol features, queue count,
    /// configuration space.
    pub fn handshake(&mut self, needs: HandshakeNeeds) -> Result<BackendInfo, FrontendError> {
        self.call("SET_OWNER", |f| f.set_owner())?;
        let features = self.call("GET_FEATURES", |f| f.get_features())?;
        if features & PROTOCOL_FEATURES == 0 {
            return Err(FrontendError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FrontendError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let offered = self.call_mut("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        for (needed, name) in [
            (VhostUserProtocolFeatures::MQ, "the MQ protocol feature"),
            (
                VhostUserProtocolFeatures::CONFIG,
                "the CONFIG protocol feature",
            ),
        ] {
            if needs.protocol_features.contains(needed) && !offered.contains(needed) {
                return Err(FrontendError::MissingFeature(name));
            }
        }
        let wanted = needs.protocol_features
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        let protocol_features = offered & wanted;
        self.call_mut("SET_PROTOCOL_FEATURES", |f| {
            f.set_protocol_features(protocol_features)
        })?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request asks for an acknowledgement.
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let max_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            self.call_mut("GET_QUEUE_NUM", |f| f.get_queue_num())?
        } else {
            1
        };
        let mut config = vec![0u8; needs.config_size];
        if needs.config_size > 0 {
            let size = u32::try_from(needs.config_size).unwrap_or(u32::MAX);
            let (_, payload) = self.call_mut("GET_CONFIG", |f| {
                f.get_config(0, size, VhostUserConfigFlags::empty(), &config)
            })?;
            let n = payload.len().min(config.len());
            config[..n].copy_from_slice(&payload[..n]);
        }
        Ok(BackendInfo {
            features,
            protocol_features,
            max_queues,
            config,
        })
    }

    /// SET_CONFIG: the driver wrote the configuration space (e.g. `writeback`).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        self.call_mut("SET_CONFIG", |f| {
            f.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        })
    }
}

impl VhostConn for Connection {
    type Backend = Frontend;
    const RING_ADDRESSES: RingAddresses = RingAddresses::Vmm;

    fn call<T>(
        &mut self,
        request: &'static str,
        f: impl FnOnce(&Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError> {
        self.call_mut(request, |fe| f(fe))
    }

    fn enable_ring(&mut self, index: usize) -> Result<(), FrontendError> {
        self.call_mut("SET_VRING_ENABLE", |f| f.set_vring_enable(index, true))
    }

    fn disable_ring(&mut self, _index: usize) -> Result<(), FrontendError> {
        // GET_VRING_BASE stops the ring.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_reports_overdue_requests() {
        let w = Watchdog::default();
        assert_eq!(w.overdue(Duration::ZERO), None);
        w.begin("GET_CONFIG");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(w.overdue(Duration::ZERO), Some("GET_CONFIG"));
        assert_eq!(w.overdue(Duration::from_secs(60)), None);
        w.end();
        assert_eq!(w.overdue(Duration::ZERO), None);
    }

    #[test]
    fn the_requests_of_an_operation_are_timed_from_its_start() {
        let w = Watchdog::default();
        w.set_operation(Some(Instant::now() - Duration::from_secs(4)));
        w.begin("SET_VRING_ADDR");
        assert_eq!(w.overdue(Duration::from_secs(3)), Some("SET_VRING_ADDR"));
        w.end();
        w.set_operation(None);
        w.begin("GET_CONFIG");
        assert_eq!(w.overdue(Duration::from_secs(3)), None);
    }

    #[test]
    fn connecting_to_nothing_fails_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.sock");
        let err = Connection::open(&missing).err().unwrap();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("cannot connect to {}: ", missing.display())),
            "{msg}"
        );
        assert!(msg.contains("is the backend running?"), "{msg}");
        // A socket file nobody listens on any more: refused.
        let path = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let msg = Connection::open(&path).err().unwrap().to_string();
        assert!(msg.contains("nobody listens on it"), "{msg}");
    }
}
