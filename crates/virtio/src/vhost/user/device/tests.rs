//! Start-up failures of the vhost-user-blk device, against sockets that are not
//! backends. The conversation with a real backend is tested in
//! `crates/virtio/tests/process_vhost_user_frontend.rs` (qemu-storage-daemon).

use super::*;
use crate::vhost::blk::VhostUserBlkConfig;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

fn config(socket: &Path) -> VhostUserBlkConfig {
    VhostUserBlkConfig {
        socket: socket.to_path_buf(),
        queues: None,
    }
}

#[test]
fn a_missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let err = config(&path).connect("vu0").err().unwrap();
    let msg = err.to_string();
    let p = path.display();
    assert!(
        msg.starts_with(&format!(
            "--vhost-user-blk socket={p}: cannot connect to {p}: "
        )),
        "{msg}"
    );
    assert!(msg.contains("is the backend running?"), "{msg}");
}

#[test]
fn a_peer_that_hangs_up_fails_the_handshake_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || {
        // Accept, read a little, hang up.
        let (s, _) = listener.accept().unwrap();
        drop(s);
    });
    let start = Instant::now();
    let err = config(&path).connect("vu0").err().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    let msg = err.to_string();
    assert!(msg.contains("failed"), "{msg}");
    peer.join().unwrap();
}

#[test]
fn a_peer_that_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        // Hold the connection open without answering until the test is done.
        let _ = rx.recv_timeout(Duration::from_secs(30));
        drop(s);
    });
    let start = Instant::now();
    let err = config(&path).connect("vu0").err().unwrap();
    let took = start.elapsed();
    assert!(
        took >= super::super::connection::REQUEST_TIMEOUT,
        "{took:?}"
    );
    assert!(
        took < super::super::connection::REQUEST_TIMEOUT + Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "--vhost-user-blk socket={}: the backend did not answer GET_FEATURES within 5 s",
            path.display()
        )
    );
    tx.send(()).unwrap();
    peer.join().unwrap();
}

// ---- A scripted backend speaking the vhost-user wire protocol ----

mod fake {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;

    /// One request as the backend received it.
    pub struct Msg {
        pub code: u32,
        pub body: Vec<u8>,
        pub file: Option<File>,
    }

    impl Msg {
        pub fn u32_at(&self, off: usize) -> u32 {
            u32::from_le_bytes(self.body[off..off + 4].try_into().unwrap())
        }
        pub fn u64_at(&self, off: usize) -> u64 {
            u64::from_le_bytes(self.body[off..off + 8].try_into().unwrap())
        }
    }

    /// What the backend answers.
    #[derive(Clone)]
    pub struct Script {
        pub features: u64,
        pub protocol_features: u64,
        pub queue_num: u64,
        pub config: Vec<u8>,
        /// Acknowledge requests that ask for it (REPLY_ACK), except those in `silent`.
        pub reply_ack: bool,
        /// Requests never answered, not even acknowledged.
        pub silent: Vec<u32>,
        /// Requests answered (or acknowledged) only after `delay`: a slow, live backend.
        pub slow: Vec<u32>,
        /// How long a `slow` request waits for its answer.
        pub delay: std::time::Duration,
    }

    pub struct Backend {
        pub socket: PathBuf,
        pub msgs: Arc<Mutex<Vec<Msg>>>,
        /// The accepted connection, to hang up on the frontend.
        pub conn: Arc<Mutex<Option<UnixStream>>>,
        thread: Option<JoinHandle<()>>,
        _dir: tempfile::TempDir,
    }

    impl Backend {
        pub fn start(script: Script) -> Backend {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("fake.sock");
            let listener = UnixListener::bind(&socket).unwrap();
            let msgs = Arc::new(Mutex::new(Vec::new()));
            let conn = Arc::new(Mutex::new(None));
            let (m, c) = (msgs.clone(), conn.clone());
            let thread = std::thread::spawn(move || {
                let (s, _) = listener.accept().unwrap();
                *c.lock().unwrap() = Some(s.try_clone().unwrap());
                serve(s, &script, &m);
            });
            Backend {
                socket,
                msgs,
                conn,
                thread: Some(thread),
                _dir: dir,
            }
        }

        /// Waits until `n` requests arrived (requests without a reply are not
        /// waited for by the frontend), then takes them out.
        pub fn take_n(&self, n: usize) -> Vec<Msg> {
            let start = std::time::Instant::now();
            while self.msgs.lock().unwrap().len() < n {
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(10),
                    "fewer than {n} requests arrived"
                );
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            self.take()
        }

        /// The requests received so far, taken out.
        pub fn take(&self) -> Vec<Msg> {
            std::mem::take(&mut *self.msgs.lock().unwrap())
        }

        pub fn hang_up(&self) {
            if let Some(s) = self.conn.lock().unwrap().as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    impl Drop for Backend {
        fn drop(&mut self) {
            self.hang_up();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    pub fn codes(msgs: &[Msg]) -> Vec<u32> {
        msgs.iter().map(|m| m.code).collect()
    }

    /// One request from the frontend: (code, flags, body, the descriptor with it);
    /// `None` once the frontend hung up.
    pub fn read_request(s: &mut UnixStream) -> Option<(u32, u32, Vec<u8>, Option<File>)> {
        let mut hdr = [0u8; 12];
        let (n, file) = match s.recv_with_fd(&mut hdr) {
            Ok((0, _)) | Err(_) => return None,
            Ok(v) => v,
        };
        if n < 12 && s.read_exact(&mut hdr[n..]).is_err() {
            return None;
        }
        let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size];
        s.read_exact(&mut body).ok()?;
        Some((code, flags, body, file))
    }

    fn serve(mut s: UnixStream, script: &Script, msgs: &Mutex<Vec<Msg>>) {
        loop {
            let Some((code, flags, body, file)) = read_request(&mut s) else {
                return;
            };
            let reply: Option<Vec<u8>> = match code {
                GET_FEATURES => Some(script.features.to_le_bytes().to_vec()),
                GET_PROTOCOL_FEATURES => Some(script.protocol_features.to_le_bytes().to_vec()),
                GET_QUEUE_NUM => Some(script.queue_num.to_le_bytes().to_vec()),
                GET_CONFIG => {
                    let off = u32::from_le_bytes(body[0..4].try_into().unwrap()) as usize;
                    let len = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
                    let mut r = body[..12].to_vec();
                    r.extend_from_slice(&script.config[off..off + len]);
                    Some(r)
                }
                GET_VRING_BASE => {
                    let mut r = body[..4].to_vec();
                    r.extend_from_slice(&0u32.to_le_bytes());
                    Some(r)
                }
                _ => None,
            };
            msgs.lock().unwrap().push(Msg { code, body, file });
            let wants_ack = script.reply_ack && flags & 0x8 != 0 && !script.silent.contains(&code);
            let reply = match reply {
                None if wants_ack => Some(0u64.to_le_bytes().to_vec()),
                r => r,
            };
            if let Some(payload) = reply {
                if script.slow.contains(&code) {
                    std::thread::sleep(script.delay);
                }
                let mut out = Vec::new();
                out.extend_from_slice(&code.to_le_bytes());
                out.extend_from_slice(&((flags & 0x3) | 0x4).to_le_bytes());
                out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                out.extend_from_slice(&payload);
                if s.write_all(&out).is_err() {
                    return;
                }
            }
        }
    }
}

use crate::test_utils::mmio_driver::{r32, w32, LIVE};
use crate::test_utils::{mmio_driver, DriverRing};
use crate::transport::mmio::*;
use fake::*;
use std::io::Write as _;
use std::os::unix::io::AsRawFd;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const F_INDIRECT: u64 = 1 << 28;
const F_PROTOCOL: u64 = 1 << 30;
const F_LOG_ALL: u64 = 1 << 26;
const F_NOTIFY_ON_EMPTY: u64 = 1 << 24;
const F_RING_PACKED: u64 = 1 << 34;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_CONFIG_WCE: u64 = 1 << 11;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_F_SECURE_ERASE: u64 = 1 << 16;
const PROTO_MQ: u64 = 1;
const PROTO_LOG_SHMFD: u64 = 2;
const PROTO_CONFIG: u64 = 0x200;

fn script() -> Script {
    let mut config = vec![0u8; 60];
    config[..8].copy_from_slice(&2048u64.to_le_bytes());
    config[34..36].copy_from_slice(&4u16.to_le_bytes());
    Script {
        features: F_VERSION_1
            | F_EVENT_IDX
            | F_INDIRECT
            | F_PROTOCOL
            | F_LOG_ALL
            | F_NOTIFY_ON_EMPTY
            | F_RING_PACKED
            | BLK_F_FLUSH
            | BLK_F_CONFIG_WCE
            | BLK_F_MQ
            | BLK_F_SECURE_ERASE,
        protocol_features: PROTO_MQ | PROTO_CONFIG | PROTO_LOG_SHMFD,
        queue_num: 4,
        config,
        reply_ack: false,
        silent: Vec::new(),
        slow: Vec::new(),
        delay: Duration::ZERO,
    }
}

/// Driver initialisation with the queues in `ready` set up, queue q's rings at
/// 0x10_0000 * (q + 1).
fn init(t: &mut MmioTransport, features: u64, ready: &[u32]) {
    let rings: Vec<(u32, DriverRing)> = ready
        .iter()
        .map(|&q| (q, DriverRing::at(0x10_0000 * u64::from(q + 1), 16)))
        .collect();
    let rings: Vec<(u32, &DriverRing)> = rings.iter().map(|(q, r)| (*q, r)).collect();
    mmio_driver::init(t, features, &rings);
}

fn readable(fd: &impl AsRawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    unsafe { libc::poll(&mut pfd, 1, 10_000) == 1 }
}

fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn handshake_features_and_config() {
    let backend = Backend::start(script());
    let dev = config(&backend.socket).connect("vu0").unwrap();
    assert_eq!(
        codes(&backend.take()),
        [
            SET_OWNER,
            GET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            GET_QUEUE_NUM,
            GET_CONFIG
        ]
    );
    // Offered: the backend's device and ring features the transport implements.
    // Not: PROTOCOL_FEATURES, LOG_ALL, NOTIFY_ON_EMPTY, packed rings,
    // SECURE_ERASE (its config fields are beyond the 60 bytes read).
    assert_eq!(
        dev.avail_features(),
        F_VERSION_1 | F_EVENT_IDX | F_INDIRECT | BLK_F_FLUSH | BLK_F_CONFIG_WCE | BLK_F_MQ
    );
    assert_eq!(dev.queue_count(), 4, "the backend's num_queues");
    assert_eq!(dev.capacity_sectors(), 2048);
    assert_eq!(dev.device_type(), 2);
    assert!(dev.interrupt_status_always_used());
    drop(dev);
    // Nothing was started, so nothing is stopped.
    assert!(codes(&backend.take()).is_empty());

    // queues=2: config num_queues says 2.
    let backend = Backend::start(script());
    let dev = VhostUserBlkConfig {
        socket: backend.socket.clone(),
        queues: Some(2),
    }
    .connect("vu0")
    .unwrap();
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 2);
    let msgs = backend.take();
    // SET_PROTOCOL_FEATURES acks MQ and CONFIG only (no LOG_SHMFD).
    let set = msgs
        .iter()
        .find(|m| m.code == SET_PROTOCOL_FEATURES)
        .unwrap();
    assert_eq!(set.u64_at(0), PROTO_MQ | PROTO_CONFIG);
    // GET_CONFIG: 60 bytes from 0.
    let get = msgs.iter().find(|m| m.code == GET_CONFIG).unwrap();
    assert_eq!((get.u32_at(0), get.u32_at(4)), (0, 60));
}

#[test]
fn a_backend_without_the_config_protocol_feature_is_refused() {
    let mut s = script();
    s.protocol_features = PROTO_MQ;
    let backend = Backend::start(s);
    let err = config(&backend.socket).connect("vu0").err().unwrap();
    assert!(
        err.to_string()
            .ends_with("the backend does not offer the CONFIG protocol feature, which evmm needs"),
        "{err}"
    );
    let mut s = script();
    s.features &= !F_PROTOCOL;
    let backend = Backend::start(s);
    let err = config(&backend.socket).connect("vu0").err().unwrap();
    assert!(
        err.to_string().contains("VHOST_USER_F_PROTOCOL_FEATURES"),
        "{err}"
    );
}

#[test]
fn activation_hands_over_memory_rings_and_the_very_eventfds() {
    let backend = Backend::start(script());
    let dev = config(&backend.socket).connect("vu0").unwrap();
    backend.take();
    let mem = crate::test_utils::memfd_memory(16 << 20);
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = irqfd.try_clone().unwrap();
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irqfd).unwrap();
    let acked = F_VERSION_1 | F_EVENT_IDX | BLK_F_FLUSH;
    init(&mut t, acked, &[0, 1]);
    assert!(t.is_activated());
    let msgs = backend.take_n(14);
    let per_queue = [
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    let mut expected = vec![SET_FEATURES, SET_MEM_TABLE];
    expected.extend(per_queue);
    expected.extend(per_queue);
    assert_eq!(
        codes(&msgs),
        expected,
        "queues 2 and 3 are not ready: not started"
    );

    // SET_FEATURES: the driver's features plus PROTOCOL_FEATURES.
    assert_eq!(msgs[0].u64_at(0), acked | F_PROTOCOL);
    // SET_MEM_TABLE: one region, the memfd, evmm's address.
    let mt = &msgs[1];
    assert_eq!(mt.u32_at(0), 1);
    assert_eq!(mt.u64_at(8), 0, "guest address");
    assert_eq!(mt.u64_at(16), 16 << 20, "size");
    assert_eq!(mt.u64_at(24), host, "evmm's address");
    assert_eq!(mt.u64_at(32), 0, "offset in the memfd");
    let memfd = mt.file.as_ref().expect("the memfd");
    // It is the guest RAM: a byte written by the guest is in the file.
    mem.write_obj(0x5au8, GuestAddress(0x1234)).unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(memfd, &mut b, 0x1234).unwrap();
    assert_eq!(b, [0x5a]);

    for (q, m) in [(0u32, &msgs[2..8]), (1, &msgs[8..14])] {
        let base = 0x10_0000 * u64::from(q + 1);
        assert_eq!((m[0].u32_at(0), m[0].u32_at(4)), (q, 16), "SET_VRING_NUM");
        assert_eq!(m[1].u32_at(0), q);
        assert_eq!(m[1].u32_at(4), 0, "no logging");
        assert_eq!(m[1].u64_at(8), host + base, "descriptor table");
        assert_eq!(m[1].u64_at(16), host + base + 0x2000, "used ring");
        assert_eq!(m[1].u64_at(24), host + base + 0x1000, "available ring");
        assert_eq!((m[2].u32_at(0), m[2].u32_at(4)), (q, 0), "SET_VRING_BASE 0");
        assert_eq!(m[3].u64_at(0), u64::from(q), "SET_VRING_CALL with an fd");
        assert_eq!(m[4].u64_at(0), u64::from(q), "SET_VRING_KICK with an fd");
        assert_eq!(
            (m[5].u32_at(0), m[5].u32_at(4)),
            (q, 1),
            "SET_VRING_ENABLE 1"
        );
        // The kick the backend got is the queue's kick eventfd (KVM's ioeventfd).
        let mut kick = m[4].file.as_ref().unwrap();
        kick.write_all(&1u64.to_le_bytes()).unwrap();
        assert_eq!(t.queue_kicks()[q as usize].read().unwrap(), 1);
        // The call it got is the device's irqfd.
        let mut call = m[3].file.as_ref().unwrap();
        call.write_all(&1u64.to_le_bytes()).unwrap();
        assert!(readable(&irq));
        assert_eq!(irq.read().unwrap(), 1);
    }

    // InterruptStatus: VRING reads set although evmm raised nothing; ACK is harmless.
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    w32(&mut t, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    t.config_changed();
    assert_eq!(
        r32(&mut t, INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    );
    w32(&mut t, INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);

    // `writeback` goes to the backend (CONFIG_WCE offered); other writes do not.
    t.write(CONFIG, &[0, 0, 0, 0]);
    t.write(CONFIG + 32, &[1]);
    let msgs = backend.take_n(1);
    assert_eq!(codes(&msgs), [SET_CONFIG]);
    assert_eq!((msgs[0].u32_at(0), msgs[0].u32_at(4)), (32, 1));
    assert_eq!(msgs[0].body[12], 1);
    let mut wce = [0u8; 1];
    t.read(CONFIG + 32, &mut wce);
    assert_eq!(wce, [1]);

    // Reset: GET_VRING_BASE on each started queue.
    w32(&mut t, STATUS, 0);
    let msgs = backend.take();
    assert_eq!(codes(&msgs), [GET_VRING_BASE, GET_VRING_BASE]);
    assert_eq!((msgs[0].u32_at(0), msgs[1].u32_at(0)), (0, 1));
    assert_eq!(r32(&mut t, INTERRUPT_STATUS), 0, "not live");

    // Re-activation starts the rings again; dropping the device stops them.
    init(&mut t, F_VERSION_1, &[2]);
    let msgs = backend.take_n(2 + per_queue.len());
    assert_eq!(msgs.len(), 2 + per_queue.len());
    assert_eq!(msgs[2].u32_at(0), 2);
    let m = t.metrics();
    assert_eq!(m["device"]["activations"], 2);
    assert_eq!(m["device"]["backend"], "connected");
    drop(t);
    assert_eq!(codes(&backend.take()), [GET_VRING_BASE]);
}

/// Where the single-request tests put their ring (queue 0 of `init`) and status byte.
const RING: (u64, u64, u64) = (0x10_0000, 0x10_1000, 0x10_2000);
const REQ_STATUS: u64 = 0x20_0000;

/// Makes one request available on queue 0: one descriptor, a writable status byte
/// (0xee until someone answers it).
fn post_one_request(mem: &GuestMemoryMmap) {
    let (desc, avail, _) = RING;
    mem.write_obj(REQ_STATUS, GuestAddress(desc)).unwrap();
    mem.write_obj(1u32, GuestAddress(desc + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap(); // VRING_DESC_F_WRITE
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(REQ_STATUS)).unwrap();
}

/// Waits for the request of [`post_one_request`] to be used and checks its IOERR.
fn wait_for_ioerr(mem: &GuestMemoryMmap) {
    let (_, _, used) = RING;
    wait_for("used entry", || {
        mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() == 1
    });
    let status: u8 = mem.read_obj(GuestAddress(REQ_STATUS)).unwrap();
    assert_eq!(
        status,
        virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8
    );
}

#[test]
fn a_backend_that_hangs_up_while_live_is_taken_over() {
    let backend = Backend::start(script());
    let dev = config(&backend.socket).connect("vu0").unwrap();
    assert_eq!(backend.take().len(), 6, "the handshake");
    let mem = crate::test_utils::memfd_memory(16 << 20);
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = irqfd.try_clone().unwrap();
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irqfd).unwrap();
    init(&mut t, F_VERSION_1, &[0]);
    backend.take_n(8);
    // A request the backend took and never answered.
    post_one_request(&mem);

    backend.hang_up();
    assert!(readable(&irq), "the takeover interrupts the guest");
    wait_for_ioerr(&mem);
    let m = t.metrics();
    assert_eq!(m["device"]["backend"], "lost");
    assert_eq!(m["device"]["taken_over"], true);
    assert_eq!(m["device"]["takeover"]["requests_failed"], 1);
    // The device stays live; the driver sees no NEEDS_RESET.
    assert_eq!(r32(&mut t, STATUS), LIVE);
    // A reset sends nothing to the lost backend and returns at once.
    let start = Instant::now();
    w32(&mut t, STATUS, 0);
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(t.metrics()["device"]["taken_over"], false);
    drop(t);
    assert!(codes(&backend.take()).is_empty());
}

#[test]
fn a_backend_that_stops_answering_while_live_gets_a_reset_not_a_second_writer() {
    const PROTO_REPLY_ACK: u64 = 1 << 3;
    let mut s = script();
    s.protocol_features |= PROTO_REPLY_ACK;
    s.reply_ack = true;
    s.silent = vec![SET_CONFIG];
    let backend = Backend::start(s);
    let dev = config(&backend.socket).connect("vu0").unwrap();
    let mem = crate::test_utils::memfd_memory(16 << 20);
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irqfd).unwrap();
    init(&mut t, F_VERSION_1, &[0]);
    // A request the backend took and has not answered yet.
    post_one_request(&mem);
    let (_, _, used) = RING;

    // The driver turns the write cache on; the backend never answers SET_CONFIG (it is
    // alive, maybe just slow, and still has the ring). The write returns at once (the
    // control thread sends it); the backend is declared lost after the timeout.
    let start = Instant::now();
    t.write(CONFIG + crate::blk::config::OFF_WRITEBACK as u64, &[1]);
    assert!(start.elapsed() < Duration::from_secs(1));
    wait_for("the backend declared lost", || {
        t.metrics()["device"]["backend"] == "lost"
    });
    let m = t.metrics();
    // No takeover of a ring the backend may still be serving: the request is left to
    // it, and the driver is asked to reset the device.
    assert_eq!(m["device"]["taken_over"], false);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(REQ_STATUS)).unwrap(), 0xee);
    assert_ne!(r32(&mut t, STATUS) & crate::status::DEVICE_NEEDS_RESET, 0);
    // The reset sends nothing to the backend; the rings set up after it are evmm's.
    backend.take();
    let start = Instant::now();
    w32(&mut t, STATUS, 0);
    assert!(start.elapsed() < Duration::from_secs(1));
    // Fresh rings, as a driver sets up after a reset (else the takeover's first pass
    // could answer the old request while the next one is being written).
    mem.write_slice(&[0u8; 0x3000], GuestAddress(RING.0))
        .unwrap();
    init(&mut t, F_VERSION_1, &[0]);
    assert_eq!(t.metrics()["device"]["taken_over"], true);
    post_one_request(&mem);
    t.queue_kicks()[0].write(1).unwrap();
    wait_for_ioerr(&mem);
    drop(t);
    assert!(
        codes(&backend.take()).is_empty(),
        "nothing sent after the loss"
    );
}

/// A slow but live backend that takes 1 s over each ring message held the vCPU that
/// activates 4 queues for 24 s. The messages are now sent by the device's control
/// thread, so the DRIVER_OK write returns at once; the whole activation gets
/// REQUEST_TIMEOUT, then the backend is declared unresponsive and the driver asked
/// for a reset, which holds the vCPU for no message.
#[test]
fn a_slow_backend_does_not_stall_the_activating_vcpu() {
    use crate::vhost::user::connection::REQUEST_TIMEOUT;
    const PROTO_REPLY_ACK: u64 = 1 << 3;
    let mut s = script();
    s.protocol_features |= PROTO_REPLY_ACK;
    s.reply_ack = true;
    s.slow = vec![
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    s.delay = Duration::from_secs(1);
    let backend = Backend::start(s);
    let dev = config(&backend.socket).connect("vu0").unwrap();
    let mem = crate::test_utils::memfd_memory(16 << 20);
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), mem, irqfd).unwrap();
    let start = Instant::now();
    init(&mut t, F_VERSION_1 | BLK_F_MQ, &[0, 1, 2, 3]);
    let stall = start.elapsed();
    println!("the activating vCPU was held {stall:?} (REQUEST_TIMEOUT {REQUEST_TIMEOUT:?})");
    // Each message takes 1 s: a vCPU that waited for even one would be held 1 s.
    assert!(
        stall < Duration::from_millis(900),
        "activation held the vCPU {stall:?}"
    );
    // The activation gives up after one REQUEST_TIMEOUT (24 s of messages otherwise).
    wait_for("the slow backend declared unresponsive", || {
        t.metrics()["device"]["backend"] == "lost"
    });
    let lost_after = start.elapsed();
    println!("declared unresponsive after {lost_after:?}");
    assert!(
        lost_after < REQUEST_TIMEOUT + Duration::from_secs(3),
        "{lost_after:?}"
    );
    assert_ne!(r32(&mut t, STATUS) & crate::status::DEVICE_NEEDS_RESET, 0);
    // The reset that follows sends nothing and holds nobody.
    let start = Instant::now();
    w32(&mut t, STATUS, 0);
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// A reset right after DRIVER_OK races the control thread's activation: whichever
/// comes first, the backend sees whole activations followed by their rings' stop,
/// never rings it was not given stopped or a stale activation after a reset.
#[test]
fn resets_racing_activations_leave_the_backend_with_whole_sequences() {
    let mut s = script();
    s.protocol_features |= 1 << 3; // REPLY_ACK: each message is answered
    s.reply_ack = true;
    let backend = Backend::start(s);
    let dev = config(&backend.socket).connect("vu0").unwrap();
    backend.take();
    let mem = crate::test_utils::memfd_memory(16 << 20);
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), mem, irqfd).unwrap();
    let (mut sent, mut dropped) = (0, 0);
    for i in 0..40u64 {
        init(&mut t, F_VERSION_1, &[0]);
        // From at once to well after the activation went out.
        std::thread::sleep(Duration::from_micros(i * i * 10));
        w32(&mut t, STATUS, 0);
        let got = codes(&backend.take());
        let whole = [
            SET_FEATURES,
            SET_MEM_TABLE,
            SET_VRING_NUM,
            SET_VRING_ADDR,
            SET_VRING_BASE,
            SET_VRING_CALL,
            SET_VRING_KICK,
            SET_VRING_ENABLE,
            GET_VRING_BASE,
        ];
        if got.is_empty() {
            dropped += 1;
        } else {
            assert_eq!(got, whole, "an activation and its reset");
            sent += 1;
        }
    }
    println!("{sent} activations sent before their reset, {dropped} dropped by it");
    assert_eq!(t.metrics()["device"]["backend"], "connected");
    // The device still works: the next activation reaches the backend whole.
    init(&mut t, F_VERSION_1, &[0]);
    assert_eq!(
        codes(&backend.take_n(8))[..2],
        [SET_FEATURES, SET_MEM_TABLE]
    );
}

#[test]
fn memory_that_cannot_be_shared_fails_activation_not_the_backend() {
    let backend = Backend::start(script());
    let dev = config(&backend.socket).connect("vu0").unwrap();
    backend.take();
    // Anonymous memory: no file descriptor for SET_MEM_TABLE.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), mem, irqfd).unwrap();
    init(&mut t, F_VERSION_1, &[0]);
    assert!(!t.is_activated());
    assert_ne!(r32(&mut t, STATUS) & 0x40, 0, "DEVICE_NEEDS_RESET");
    assert_eq!(t.metrics()["device"]["backend"], "connected");
    assert_eq!(t.metrics()["device"]["activations"], 0);
    w32(&mut t, STATUS, 0);
    drop(t);
    assert!(codes(&backend.take()).is_empty(), "nothing was sent");
}

// ---- A generated hostile backend ----

/// A backend that answers each request of evmm's frontend in a way drawn from `rng`:
/// as a backend should, with the wrong request code, with a body of the wrong size
/// (framed consistently, so nothing waits for bytes that never come), with random
/// contents, with descriptors attached, or by hanging up there and then.
fn hostile_backend(seed: u64) -> (PathBuf, std::thread::JoinHandle<()>, tempfile::TempDir) {
    use crate::test_utils::SeededRng;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hostile.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let honest = script();
    let thread = std::thread::spawn(move || {
        let mut rng = SeededRng::new(seed);
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        loop {
            let Some((code, flags, body, _fd)) = read_request(&mut s) else {
                return;
            };
            let good: Option<Vec<u8>> = match code {
                GET_FEATURES => Some(honest.features.to_le_bytes().to_vec()),
                GET_PROTOCOL_FEATURES => Some(
                    (honest.protocol_features | if rng.chance(50) { 1 << 3 } else { 0 })
                        .to_le_bytes()
                        .to_vec(),
                ),
                GET_QUEUE_NUM => Some(
                    (if rng.chance(20) {
                        32768
                    } else {
                        honest.queue_num
                    })
                    .to_le_bytes()
                    .to_vec(),
                ),
                GET_CONFIG => {
                    let mut r = body.get(..12).unwrap_or_default().to_vec();
                    r.extend_from_slice(&honest.config);
                    Some(r)
                }
                GET_VRING_BASE => Some(body.get(..8).unwrap_or_default().to_vec()),
                _ if flags & 0x8 != 0 => Some(0u64.to_le_bytes().to_vec()),
                _ => None,
            };
            let Some(mut payload) = good else { continue };
            let mut reply_code = code;
            let mut attach = false;
            match rng.below(10) {
                0 => reply_code = rng.below(60) as u32,
                1 => payload.resize(rng.below(80) as usize, 0xa5),
                2 => payload.iter_mut().for_each(|b| *b = rng.next_u64() as u8),
                3 => attach = true,
                4 => return, // hang up instead of answering
                _ => {}
            }
            let mut out = Vec::new();
            out.extend_from_slice(&reply_code.to_le_bytes());
            out.extend_from_slice(&((flags & 0x3) | 0x4).to_le_bytes());
            out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&payload);
            let sent = if attach {
                let e = EventFd::new(EFD_NONBLOCK).unwrap();
                s.send_with_fds(&[&out[..]], &[e.as_raw_fd()])
                    .map(|_| ())
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
            } else {
                s.write_all(&out)
            };
            if sent.is_err() {
                return;
            }
        }
    });
    (socket, thread, dir)
}

#[test]
fn a_generated_hostile_backend_gets_a_clear_error_or_a_device_never_a_crash() {
    let seeds = crate::test_utils::soak_seeds(30);
    let (mut refused, mut live) = (0, 0);
    for seed in 0..seeds {
        let (socket, thread, _dir) = hostile_backend(seed);
        match config(&socket).connect("vu-hostile") {
            Err(e) => {
                // One line that names the socket.
                let text = e.to_string();
                assert!(text.contains("hostile.sock"), "seed {seed}: {text}");
                assert!(!text.contains('\n'), "seed {seed}: {text}");
                refused += 1;
            }
            Ok(dev) => {
                live += 1;
                assert!(dev.queue_count() <= crate::blk::config::MAX_QUEUES as usize);
                let mem = crate::test_utils::memfd_memory(16 << 20);
                let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
                let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irqfd).unwrap();
                // Activation and a reset against whatever the backend does; both return.
                let start = Instant::now();
                init(&mut t, F_VERSION_1, &[0]);
                w32(&mut t, STATUS, 0);
                assert!(
                    start.elapsed() < Duration::from_secs(12),
                    "seed {seed}: {:?}",
                    start.elapsed()
                );
                drop(t);
            }
        }
        thread.join().unwrap();
    }
    eprintln!("hostile backends: {seeds} seeds, {refused} refused at start-up, {live} ran");
    assert!(
        refused > 0 && live > 0,
        "the generator must produce both outcomes"
    );
}
