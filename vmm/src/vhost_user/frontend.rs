//! The vhost-user conversation with a vhost-user-blk backend, on the `vhost` crate's
//! [`Frontend`].
//!
//! * [`Connection::connect`]: connect to the socket, SET_OWNER, GET_FEATURES,
//!   GET_PROTOCOL_FEATURES / SET_PROTOCOL_FEATURES (MQ and CONFIG required,
//!   REPLY_ACK used when offered: every message is then acknowledged, so a backend
//!   that refuses one is noticed at once), GET_QUEUE_NUM, GET_CONFIG.
//! * [`Connection::start`] (the guest set DRIVER_OK): SET_FEATURES, SET_MEM_TABLE,
//!   then per queue SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE 0,
//!   SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ENABLE 1.
//! * [`Connection::stop`] (reset): GET_VRING_BASE per started queue.
//!
//! Every request is timed by a [`Watchdog`]: the `vhost` crate blocks in `recv`
//! until the backend answers (and retries on a socket timeout), so a backend that
//! stops answering would block the calling vCPU thread for ever. The monitor thread
//! shuts the socket down when a request takes longer than [`REQUEST_TIMEOUT`], which
//! makes the blocked `recv` fail. A backend that is gone (socket closed) makes every
//! request fail at once.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use evmm_virtio::blk::config::CONFIG_SIZE;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

/// VHOST_USER_F_PROTOCOL_FEATURES: the backend speaks the protocol-feature
/// extension. Never offered to the guest; always acked back to the backend.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// How long a request may wait for the backend's answer before the backend is
/// declared unresponsive.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a refused connection is retried (the backend may be starting).
const CONNECT_RETRIES: u32 = 5;
/// The pause between connection attempts.
const CONNECT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Offset of `num_queues` (le16) in `struct virtio_blk_config`.
pub const CONFIG_NUM_QUEUES: usize = 34;
/// VIRTIO_BLK_F_MQ.
const BLK_F_MQ: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;

/// Errors of the conversation with a backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The socket cannot be connected to.
    #[error("cannot connect to {path}: {source}{hint}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
        /// Advice for the usual causes.
        hint: &'static str,
    },
    /// A request failed or was answered with an error.
    #[error("{request} failed: {source}")]
    Request {
        /// The vhost-user request.
        request: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend left a request unanswered for [`REQUEST_TIMEOUT`].
    #[error("the backend did not answer {0} within {secs} s", secs = REQUEST_TIMEOUT.as_secs())]
    NoAnswer(&'static str),
    /// The backend lacks a feature evmm needs.
    #[error("the backend does not offer {0}, which evmm needs")]
    MissingFeature(&'static str),
    /// More queues asked for than the backend has.
    #[error("queues={requested} but the backend supports at most {max}")]
    TooManyQueues {
        /// `queues=` on the command line.
        requested: u16,
        /// GET_QUEUE_NUM.
        max: u64,
    },
    /// Several queues asked for from a backend without VIRTIO_BLK_F_MQ.
    #[error("queues={0} needs VIRTIO_BLK_F_MQ, which the backend does not offer")]
    NoMultiqueue(u16),
    /// A guest memory region cannot be shared (it has no file descriptor).
    #[error("guest memory region at {0:#x} has no file descriptor to share")]
    Memory(u64),
    /// A ring is not inside one guest memory region.
    #[error("queue {queue}: its {ring} at {addr:#x} is not inside guest memory")]
    Ring {
        /// The queue index.
        queue: usize,
        /// "descriptor table", "available ring" or "used ring".
        ring: &'static str,
        /// Its guest-physical address.
        addr: u64,
    },
}

impl FrontendError {
    /// Whether the error is evmm's own, found before anything was sent (guest memory
    /// that cannot be shared, a ring outside memory): the backend is not to blame.
    pub fn is_local(&self) -> bool {
        matches!(self, FrontendError::Memory(_) | FrontendError::Ring { .. })
    }
}

/// The request in flight, for the monitor thread's deadline check.
#[derive(Debug, Default)]
pub struct Watchdog {
    busy: Mutex<Option<(Instant, &'static str)>>,
    fired: AtomicBool,
}

impl Watchdog {
    pub(crate) fn begin(&self, request: &'static str) {
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), request));
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
    /// GET_QUEUE_NUM.
    pub max_queues: u64,
    /// GET_CONFIG: the virtio-blk configuration space.
    pub config: [u8; CONFIG_SIZE],
}

impl BackendInfo {
    /// The queue count to use: `requested`, or the backend's `num_queues` (with
    /// VIRTIO_BLK_F_MQ) or 1; never more than GET_QUEUE_NUM.
    pub fn queue_count(&self, requested: Option<u16>) -> Result<u16, FrontendError> {
        let mq = self.features & BLK_F_MQ != 0;
        let max = self.max_queues;
        match requested {
            Some(n) if u64::from(n) > max => {
                Err(FrontendError::TooManyQueues { requested: n, max })
            }
            Some(n) if n > 1 && !mq => Err(FrontendError::NoMultiqueue(n)),
            Some(n) => Ok(n),
            None => {
                let from_config = if mq {
                    u16::from_le_bytes([
                        self.config[CONFIG_NUM_QUEUES],
                        self.config[CONFIG_NUM_QUEUES + 1],
                    ])
                } else {
                    1
                };
                let cap = u16::try_from(max).unwrap_or(u16::MAX);
                Ok(from_config.clamp(1, cap.max(1)))
            }
        }
    }
}

/// One queue the backend is to run.
pub struct RingSetup<'a> {
    /// The virtio queue index.
    pub index: usize,
    /// The queue as the driver set it up (guest-physical ring addresses).
    pub queue: &'a Queue,
    /// The eventfd KVM signals for this queue's QueueNotify.
    pub kick: &'a EventFd,
}

/// A connection to a vhost-user backend.
pub struct Connection {
    frontend: Frontend,
    /// The same socket, for shutting it down.
    socket: UnixStream,
    path: PathBuf,
}

impl Connection {
    /// Connects to `path`, retrying a few times while the connection is refused.
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
        };
        Ok((conn, monitor))
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
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

    fn call<T>(
        &mut self,
        watchdog: &Watchdog,
        request: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError> {
        watchdog.begin(request);
        let r = f(&mut self.frontend);
        watchdog.end();
        r.map_err(|source| {
            if watchdog.fired() {
                FrontendError::NoAnswer(request)
            } else {
                FrontendError::Request { request, source }
            }
        })
    }

    /// The start-up handshake: SET_OWNER, features, protocol features, queue count,
    /// configuration space.
    pub fn handshake(&mut self, watchdog: &Watchdog) -> Result<BackendInfo, FrontendError> {
        self.call(watchdog, "SET_OWNER", |f| f.set_owner())?;
        let features = self.call(watchdog, "GET_FEATURES", |f| f.get_features())?;
        if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(FrontendError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FrontendError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let offered = self.call(watchdog, "GET_PROTOCOL_FEATURES", |f| {
            f.get_protocol_features()
        })?;
        for (needed, name) in [
            (VhostUserProtocolFeatures::MQ, "the MQ protocol feature"),
            (
                VhostUserProtocolFeatures::CONFIG,
                "the CONFIG protocol feature",
            ),
        ] {
            if !offered.contains(needed) {
                return Err(FrontendError::MissingFeature(name));
            }
        }
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        let protocol_features = offered & wanted;
        self.call(watchdog, "SET_PROTOCOL_FEATURES", |f| {
            f.set_protocol_features(protocol_features)
        })?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request asks for an acknowledgement.
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let max_queues = self.call(watchdog, "GET_QUEUE_NUM", |f| f.get_queue_num())?;
        let mut config = [0u8; CONFIG_SIZE];
        let (_, payload) = self.call(watchdog, "GET_CONFIG", |f| {
            f.get_config(
                0,
                CONFIG_SIZE as u32,
                VhostUserConfigFlags::empty(),
                &[0u8; CONFIG_SIZE],
            )
        })?;
        let n = payload.len().min(CONFIG_SIZE);
        config[..n].copy_from_slice(&payload[..n]);
        Ok(BackendInfo {
            features,
            protocol_features,
            max_queues,
            config,
        })
    }

    /// Hands the guest's rings to the backend and starts them. Memory regions and
    /// ring addresses are checked before anything is sent
    /// ([`FrontendError::is_local`]).
    pub fn start(
        &mut self,
        watchdog: &Watchdog,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        rings: &[RingSetup<'_>],
        call: &EventFd,
    ) -> Result<(), FrontendError> {
        let regions = memory_regions(mem)?;
        let configs = rings
            .iter()
            .map(|r| vring_config(mem, r.index, r.queue))
            .collect::<Result<Vec<_>, _>>()?;
        let features = acked_features | VHOST_USER_F_PROTOCOL_FEATURES;
        self.call(watchdog, "SET_FEATURES", |f| f.set_features(features))?;
        self.call(watchdog, "SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
        for (ring, config) in rings.iter().zip(&configs) {
            let i = ring.index;
            let size = ring.queue.size();
            self.call(watchdog, "SET_VRING_NUM", |f| f.set_vring_num(i, size))?;
            self.call(watchdog, "SET_VRING_ADDR", |f| f.set_vring_addr(i, config))?;
            self.call(watchdog, "SET_VRING_BASE", |f| f.set_vring_base(i, 0))?;
            self.call(watchdog, "SET_VRING_KICK", |f| {
                f.set_vring_kick(i, ring.kick)
            })?;
            self.call(watchdog, "SET_VRING_CALL", |f| f.set_vring_call(i, call))?;
            self.call(watchdog, "SET_VRING_ENABLE", |f| {
                f.set_vring_enable(i, true)
            })?;
        }
        Ok(())
    }

    /// Stops the rings of `queues` (GET_VRING_BASE); returns where each stopped.
    pub fn stop(
        &mut self,
        watchdog: &Watchdog,
        queues: &[usize],
    ) -> Result<Vec<u32>, FrontendError> {
        queues
            .iter()
            .map(|&i| self.call(watchdog, "GET_VRING_BASE", |f| f.get_vring_base(i)))
            .collect()
    }

    /// SET_CONFIG: the driver wrote the configuration space (e.g. `writeback`).
    pub fn set_config(
        &mut self,
        watchdog: &Watchdog,
        offset: u32,
        data: &[u8],
    ) -> Result<(), FrontendError> {
        self.call(watchdog, "SET_CONFIG", |f| {
            f.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        })
    }
}

/// SET_MEM_TABLE's regions: each guest region's memfd and offset, guest address,
/// size and evmm's userspace address.
pub fn memory_regions(
    mem: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, FrontendError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r)
                .map_err(|_| FrontendError::Memory(r.start_addr().0))
        })
        .collect()
}

/// evmm's userspace address of `len` bytes at guest address `addr`, if they lie in
/// one region.
pub fn host_address(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<u64> {
    let (region, offset) = mem.to_region_addr(GuestAddress(addr))?;
    let end = offset.0.checked_add(len)?;
    if end > region.len() {
        return None;
    }
    region.get_host_address(offset).ok().map(|p| p as u64)
}

/// SET_VRING_ADDR's addresses (evmm's userspace addresses of the three rings).
pub fn vring_config(
    mem: &GuestMemoryMmap,
    index: usize,
    queue: &Queue,
) -> Result<VringConfigData, FrontendError> {
    let size = u64::from(queue.size());
    let host = |ring: &'static str, addr: u64, len: u64| {
        host_address(mem, addr, len).ok_or(FrontendError::Ring {
            queue: index,
            ring,
            addr,
        })
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: host("descriptor table", queue.desc_table(), 16 * size)?,
        used_ring_addr: host("used ring", queue.used_ring(), 6 + 8 * size)?,
        avail_ring_addr: host("available ring", queue.avail_ring(), 6 + 2 * size)?,
        log_addr: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    fn info(features: u64, num_queues: u16, max_queues: u64) -> BackendInfo {
        let mut config = [0u8; CONFIG_SIZE];
        config[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2].copy_from_slice(&num_queues.to_le_bytes());
        BackendInfo {
            features,
            protocol_features: VhostUserProtocolFeatures::MQ,
            max_queues,
            config,
        }
    }

    #[test]
    fn queue_count_defaults_and_limits() {
        assert_eq!(info(BLK_F_MQ, 4, 4).queue_count(None).unwrap(), 4);
        assert_eq!(info(BLK_F_MQ, 4, 2).queue_count(None).unwrap(), 2);
        assert_eq!(info(BLK_F_MQ, 0, 2).queue_count(None).unwrap(), 1);
        // Without VIRTIO_BLK_F_MQ num_queues means nothing.
        assert_eq!(info(0, 4, 4).queue_count(None).unwrap(), 1);
        assert_eq!(info(BLK_F_MQ, 4, 4).queue_count(Some(3)).unwrap(), 3);
        assert!(matches!(
            info(BLK_F_MQ, 4, 4).queue_count(Some(5)),
            Err(FrontendError::TooManyQueues {
                requested: 5,
                max: 4
            })
        ));
        assert!(matches!(
            info(0, 1, 4).queue_count(Some(2)),
            Err(FrontendError::NoMultiqueue(2))
        ));
        assert_eq!(info(0, 1, 1).queue_count(Some(1)).unwrap(), 1);
        let msg = info(BLK_F_MQ, 1, 1)
            .queue_count(Some(2))
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "queues=2 but the backend supports at most 1");
    }

    #[test]
    fn memory_regions_carry_the_memfd() {
        use std::os::fd::AsRawFd;
        let ram = GuestRam::new(16 << 20).unwrap();
        let regions = memory_regions(ram.memory()).unwrap();
        assert_eq!(regions.len(), 1);
        let r = &regions[0];
        assert_eq!(r.guest_phys_addr, 0);
        assert_eq!(r.memory_size, 16 << 20);
        assert_eq!(r.mmap_offset, 0);
        assert_eq!(r.mmap_handle, ram.memfd().as_raw_fd());
        assert_eq!(
            r.userspace_addr,
            ram.memory().get_host_address(GuestAddress(0)).unwrap() as u64
        );
        // Anonymous memory cannot be shared.
        let anon = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            memory_regions(&anon),
            Err(FrontendError::Memory(0))
        ));
    }

    #[test]
    fn ring_addresses_are_translated_and_checked() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mem = ram.memory();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let mut q = Queue::new(256).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        let c = vring_config(mem, 0, &q).unwrap();
        assert_eq!(c.desc_table_addr, base + 0x1000);
        assert_eq!(c.avail_ring_addr, base + 0x2000);
        assert_eq!(c.used_ring_addr, base + 0x3000);
        assert_eq!((c.queue_size, c.queue_max_size, c.flags), (16, 256, 0));
        // A used ring running past the end of memory.
        q.set_used_ring_address(Some((16 << 20) - 8), Some(0));
        let err = vring_config(mem, 3, &q).err().unwrap();
        assert!(
            matches!(
                err,
                FrontendError::Ring {
                    queue: 3,
                    ring: "used ring",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(host_address(mem, 16 << 20, 1), None);
        assert_eq!(host_address(mem, 0, 16 << 20), Some(base));
    }

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
