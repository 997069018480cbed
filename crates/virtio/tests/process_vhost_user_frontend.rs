//! Process level: evmm's vhost-user-blk frontend against a real backend process,
//! qemu-storage-daemon (Debian's `qemu-system-x86` package), without a guest or KVM.
//!
//! The tests build the device on memfd guest memory, put it behind the virtio-mmio
//! transport and play the driver through the registers: one request at a time is
//! written into guest memory, the kick eventfd is written (as KVM's ioeventfd does) or
//! QueueNotify (as `--notify exit` does), the backend answers through the irqfd. Then
//! the daemon is killed (or stopped) and the takeover must answer with IOERR.
//!
//! These tests need qemu-storage-daemon and fail (never skip) without it.

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use evmm_testhost::{Backend, BackendKind};
use evmm_virtio::status::{ACKNOWLEDGE, DRIVER, FEATURES_OK};
use evmm_virtio::test_utils::mmio_driver::*;
use evmm_virtio::test_utils::{memfd_memory, Desc, DriverRing};
use evmm_virtio::transport::mmio::*;
use evmm_virtio::vhost::user::BackendState;
use evmm_virtio::vhost::{VhostUserBlk, VhostUserBlkConfig};
use evmm_virtio::VirtioDevice;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use vm_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const DISK_BYTES: u64 = 4 << 20;
const WAIT: Duration = Duration::from_secs(10);
const QSIZE: u16 = 16;

const EVENT_IDX: u64 = 1 << 29;

/// A qemu-storage-daemon exporting a fresh image as vhost-user-blk.
struct Daemon {
    backend: Backend,
    socket: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(num_queues: u16) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let pattern: Vec<u8> = (0..DISK_BYTES).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, pattern).unwrap();
        let socket = dir.path().join("vu.sock");
        let backend = Backend::start(BackendKind::QemuStorageDaemon, &image, &socket, num_queues)
            .unwrap_or_else(|e| panic!("{e} (Debian package qemu-system-x86)"));
        Daemon {
            backend,
            socket,
            image,
            _dir: dir,
        }
    }

    fn config(&self, queues: Option<u16>) -> VhostUserBlkConfig {
        VhostUserBlkConfig {
            socket: self.socket.clone(),
            queues,
        }
    }

    fn signal(&self, sig: i32) {
        self.backend.signal(sig);
    }

    fn kill(&mut self) {
        self.backend.kill();
    }

    fn read_image(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.image)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }
}

fn wait_readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    r == 1
}

/// One split virtqueue as the test's driver lays it out, with its request buffers.
struct Ring {
    ring: DriverRing,
    /// Where this ring's buffers are.
    buf: u64,
}

impl Ring {
    fn at(base: u64) -> Ring {
        Ring {
            ring: DriverRing::at(base, QSIZE),
            buf: base + 0x10_0000,
        }
    }

    fn hdr(&self) -> u64 {
        self.buf
    }
    fn data(&self) -> u64 {
        self.buf + 0x1000
    }
    fn status(&self) -> u64 {
        self.buf + 0x3000
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        self.ring.used_idx(mem)
    }

    /// Writes a request (IN or OUT of `len` bytes at `sector`) and makes it
    /// available; with EVENT_IDX, asks for an interrupt when it is used.
    fn submit(&mut self, mem: &GuestMemoryMmap, kind: u32, sector: u64, len: u32) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(self.hdr())).unwrap();
        mem.write_obj(0xaau8, GuestAddress(self.status())).unwrap();
        let descs = [
            Desc(self.hdr(), 16, false),
            Desc(self.data(), len, kind == VIRTIO_BLK_T_IN),
            Desc(self.status(), 1, true),
        ];
        // used_event: interrupt me when the used idx passes what is used now.
        self.ring.set_used_event(mem, self.ring.avail_idx());
        self.ring.add_chain(mem, &descs);
    }

    fn status_byte(&self, mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(self.status())).unwrap()
    }
}

/// The transport around a device, with its irqfd (what KVM would inject from).
struct Setup {
    t: MmioTransport,
    irq: EventFd,
    mem: GuestMemoryMmap,
}

fn setup(dev: VhostUserBlk) -> Setup {
    let mem = memfd_memory(64 << 20);
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = irqfd.try_clone().unwrap();
    let t = MmioTransport::new(Box::new(dev), mem.clone(), irqfd).unwrap();
    Setup { t, irq, mem }
}

impl Setup {
    /// Full driver initialisation with `rings` (queue i on rings[i]).
    fn init(&mut self, features: u64, rings: &[&Ring]) {
        let t = &mut self.t;
        negotiate(t, features);
        assert_eq!(r32(t, STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        for (i, r) in rings.iter().enumerate() {
            // The rings start zeroed, as a driver allocates them.
            let zeros = vec![0u8; 0x3000];
            self.mem
                .write_slice(&zeros, GuestAddress(r.ring.desc))
                .unwrap();
            w32(t, QUEUE_SEL, i as u32);
            assert!(r32(t, QUEUE_NUM_MAX) >= u32::from(QSIZE));
            setup_queue(t, i as u32, &r.ring);
        }
        w32(t, STATUS, LIVE);
        assert!(t.is_activated());
        assert_eq!(r32(t, STATUS), LIVE, "no DEVICE_NEEDS_RESET");
        // libvhost-user signals the call eventfd when it gets it (SET_VRING_CALL), and a
        // takeover interrupts once when it starts: take that interrupt as a driver does
        // (read InterruptStatus, acknowledge it). Left unacknowledged, the transport
        // would not send the next interrupt (it does not interrupt twice for one status).
        let _ = self.irq.read();
        let status = r32(&mut self.t, INTERRUPT_STATUS);
        w32(&mut self.t, INTERRUPT_ACK, status);
    }

    fn offered(&mut self) -> u64 {
        offered_features(&mut self.t)
    }

    /// Kicks queue `q` the way KVM's ioeventfd does (or through QueueNotify) and
    /// waits for the interrupt and the used entry.
    fn kick_and_wait(&mut self, ring: &Ring, q: u32, through_register: bool) {
        if through_register {
            w32(&mut self.t, QUEUE_NOTIFY, q);
        } else {
            self.t.queue_kicks()[q as usize].write(1).unwrap();
        }
        let start = Instant::now();
        while ring.used_idx(&self.mem) != ring.ring.avail_idx() {
            assert!(
                wait_readable(&self.irq, WAIT.saturating_sub(start.elapsed())),
                "no interrupt within {WAIT:?} (used idx {}, submitted {})",
                ring.used_idx(&self.mem),
                ring.ring.avail_idx()
            );
            let _ = self.irq.read();
            // As a driver does: read InterruptStatus, acknowledge it, then look.
            let status = r32(&mut self.t, INTERRUPT_STATUS);
            w32(&mut self.t, INTERRUPT_ACK, status);
        }
    }

    fn metrics(&self) -> serde_json::Value {
        self.t.metrics()["device"].clone()
    }

    fn wait_backend(&self, state: &str) {
        let start = Instant::now();
        while self.metrics()["backend"] != state {
            assert!(
                start.elapsed() < WAIT,
                "backend not {state}: {}",
                self.metrics()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn capacity(t: &mut MmioTransport) -> u64 {
    let mut cap = [0u8; 8];
    t.read(CONFIG, &mut cap);
    u64::from_le_bytes(cap)
}

#[test]
fn requests_through_qemu_storage_daemon_then_takeover_after_it_dies() {
    let mut daemon = Daemon::start(1);
    let dev = daemon.config(None).connect("vu-test").expect("connect");
    assert_eq!(dev.capacity_sectors(), DISK_BYTES / 512);
    assert_eq!(dev.queue_count(), 1);
    assert_eq!(dev.backend_state(), BackendState::Connected);
    assert!(dev.interrupt_status_always_used());
    let mut s = setup(dev);
    assert_eq!(r32(&mut s.t, DEVICE_ID), 2);
    assert_eq!(capacity(&mut s.t), DISK_BYTES / 512, "GET_CONFIG capacity");
    let offered = s.offered();
    assert_ne!(offered & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    assert_eq!(
        offered & (1 << 30),
        0,
        "VHOST_USER_F_PROTOCOL_FEATURES is not offered"
    );
    assert_eq!(offered & (1 << 26), 0, "VHOST_F_LOG_ALL is not offered");
    assert_ne!(
        offered & EVENT_IDX,
        0,
        "qemu-storage-daemon offers EVENT_IDX"
    );
    assert_eq!(r32(&mut s.t, INTERRUPT_STATUS), 0, "not live yet");

    let mut ring = Ring::at(0x10_0000);
    s.init(offered, &[&ring]);
    assert_eq!(
        r32(&mut s.t, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );

    // OUT: 1 KiB at sector 3, kicked as KVM's ioeventfd would.
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 256) as u8).collect();
    s.mem
        .write_slice(&payload, GuestAddress(ring.data()))
        .unwrap();
    ring.submit(&s.mem, VIRTIO_BLK_T_OUT, 3, 1024);
    s.kick_and_wait(&ring, 0, false);
    assert_eq!(ring.status_byte(&s.mem), VIRTIO_BLK_S_OK as u8);
    assert_eq!(
        daemon.read_image(3 * 512, 1024),
        payload,
        "data in the file"
    );
    // The InterruptStatus policy: VRING reads set and survives an ACK.
    w32(&mut s.t, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut s.t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);

    // IN: sector 100 of the original pattern, kicked through QueueNotify
    // (`--notify exit`).
    ring.submit(&s.mem, VIRTIO_BLK_T_IN, 100, 512);
    s.kick_and_wait(&ring, 0, true);
    assert_eq!(ring.status_byte(&s.mem), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 512];
    s.mem
        .read_slice(&mut back, GuestAddress(ring.data()))
        .unwrap();
    assert_eq!(back, daemon.read_image(100 * 512, 512));
    assert_eq!(s.t.notify_exits(), 1);

    // Reset (GET_VRING_BASE) and a second activation on other rings.
    w32(&mut s.t, STATUS, 0);
    assert!(!s.t.is_activated());
    assert_eq!(r32(&mut s.t, INTERRUPT_STATUS), 0);
    let mut ring = Ring::at(0x40_0000);
    s.init(offered & !EVENT_IDX, &[&ring]);
    ring.submit(&s.mem, VIRTIO_BLK_T_IN, 3, 1024);
    s.kick_and_wait(&ring, 0, false);
    assert_eq!(ring.status_byte(&s.mem), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 1024];
    s.mem
        .read_slice(&mut back, GuestAddress(ring.data()))
        .unwrap();
    assert_eq!(back, payload, "read back what was written before the reset");
    let m = s.metrics();
    assert_eq!(m["backend"], "connected");
    assert_eq!(m["activations"], 2);
    assert_eq!(m["taken_over"], false);

    // The backend dies: evmm notices, takes the queue over, answers IOERR.
    daemon.kill();
    s.wait_backend("lost");
    let start = Instant::now();
    while s.metrics()["taken_over"] != true {
        assert!(start.elapsed() < WAIT, "no takeover: {}", s.metrics());
        std::thread::sleep(Duration::from_millis(10));
    }
    ring.submit(&s.mem, VIRTIO_BLK_T_OUT, 0, 512);
    s.kick_and_wait(&ring, 0, false);
    assert_eq!(ring.status_byte(&s.mem), VIRTIO_BLK_S_IOERR as u8);
    ring.submit(&s.mem, VIRTIO_BLK_T_IN, 0, 512);
    s.kick_and_wait(&ring, 0, true);
    assert_eq!(ring.status_byte(&s.mem), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(s.metrics()["takeover"]["requests_failed"], 2);
    assert_eq!(r32(&mut s.t, STATUS), LIVE, "I/O errors, not NEEDS_RESET");

    // A reset and a re-activation with the backend gone do not hang: the
    // device is taken over at once.
    let start = Instant::now();
    w32(&mut s.t, STATUS, 0);
    let mut ring = Ring::at(0x80_0000);
    s.init(offered, &[&ring]);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    ring.submit(&s.mem, VIRTIO_BLK_T_IN, 0, 512);
    s.kick_and_wait(&ring, 0, false);
    assert_eq!(ring.status_byte(&s.mem), VIRTIO_BLK_S_IOERR as u8);
    let m = s.metrics();
    assert_eq!(m["activations"], 3);
    assert_eq!(m["takeover"]["requests_failed"], 3);

    // Dropping the transport (what evmm does at exit) does not hang either.
    let start = Instant::now();
    drop(s);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn requests_in_flight_when_the_backend_stops_answering_are_failed() {
    let daemon = Daemon::start(1);
    let dev = daemon.config(None).connect("vu-stop").unwrap();
    let mut s = setup(dev);
    let offered = s.offered();
    let mut ring = Ring::at(0x10_0000);
    s.init(offered, &[&ring]);
    ring.submit(&s.mem, VIRTIO_BLK_T_IN, 0, 512);
    s.kick_and_wait(&ring, 0, false);
    assert_eq!(ring.status_byte(&s.mem), VIRTIO_BLK_S_OK as u8);

    // The backend freezes (SIGSTOP): a request sent now is never answered by it.
    daemon.signal(libc::SIGSTOP);
    ring.submit(&s.mem, VIRTIO_BLK_T_IN, 1, 512);
    s.t.queue_kicks()[0].write(1).unwrap();
    // The driver gives up and resets the device: GET_VRING_BASE gets no answer,
    // evmm declares the backend lost after its timeout instead of hanging.
    let start = Instant::now();
    w32(&mut s.t, STATUS, 0);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(12), "reset took {took:?}");
    assert_eq!(s.metrics()["backend"], "lost");
    // Re-activated: the request is answered by the takeover.
    let mut ring = Ring::at(0x40_0000);
    s.init(offered, &[&ring]);
    ring.submit(&s.mem, VIRTIO_BLK_T_IN, 1, 512);
    s.kick_and_wait(&ring, 0, false);
    assert_eq!(ring.status_byte(&s.mem), VIRTIO_BLK_S_IOERR as u8);
    daemon.signal(libc::SIGCONT);
    drop(s);
}

#[test]
fn queues_follow_the_backend_and_are_checked() {
    let daemon = Daemon::start(2);
    // Too many queues: a clear error, nothing started.
    let err = daemon.config(Some(3)).connect("vu-mq").err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "--vhost-user-blk socket={}: queues=3 but the backend supports at most 2",
            daemon.socket.display()
        )
    );
    // The default: the backend's num_queues. (qemu-storage-daemon serves one
    // frontend at a time; the refused one above has hung up.)
    let dev = daemon.config(None).connect("vu-mq").unwrap();
    assert_eq!(dev.queue_count(), 2);
    let mut s = setup(dev);
    let mut nq = [0u8; 2];
    s.t.read(CONFIG + 34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 2, "config num_queues");
    let offered = s.offered();
    assert_ne!(offered & (1 << 12), 0, "VIRTIO_BLK_F_MQ");
    let r0 = Ring::at(0x10_0000);
    let mut r1 = Ring::at(0x40_0000);
    s.init(offered, &[&r0, &r1]);
    r1.submit(&s.mem, VIRTIO_BLK_T_IN, 7, 512);
    s.kick_and_wait(&r1, 1, false);
    assert_eq!(r1.status_byte(&s.mem), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 512];
    s.mem
        .read_slice(&mut back, GuestAddress(r1.data()))
        .unwrap();
    assert_eq!(back, daemon.read_image(7 * 512, 512));
    assert_eq!(r0.used_idx(&s.mem), 0);
    drop(s);

    // queues=1 on the same backend.
    let dev = daemon.config(Some(1)).connect("vu-mq").unwrap();
    assert_eq!(dev.queue_count(), 1);
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 1);
}
