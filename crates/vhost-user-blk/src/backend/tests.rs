//! Queue handling of the vhost-user backend on mock guest memory: requests written
//! as a driver would (descriptor table, available ring), served through a real
//! `VringMutex` as
//! vhost-user-backend's worker thread would, answered in the status byte and the used
//! ring, and announced on the call eventfd.

use super::*;
use evmm_virtio::blk::BlockConfig;
use evmm_virtio::test_utils::{Desc, DriverRing};
use std::fs::File;
use std::io::Write;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use tempfile::NamedTempFile;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const SECTORS: usize = 64;

struct Rig {
    mem: GuestMemoryMmap,
    file: NamedTempFile,
    backend: BlkBackend,
    vring: VringMutex,
    call: EventFd,
    ring: DriverRing,
}

impl Rig {
    fn new(readonly: bool) -> Self {
        Self::with_poll(readonly, evmm_virtio::poll::PollMode::Off)
    }

    fn with_poll(readonly: bool, poll: evmm_virtio::poll::PollMode) -> Self {
        let mut file = NamedTempFile::new().unwrap();
        file.write_all(&vec![0u8; SECTORS * 512]).unwrap();
        let device = BlockDevice::open(&BlockConfig {
            path: file.path().to_path_buf(),
            readonly,
            id: Some("rig".into()),
            queues: 2,
            direct: false,
            poll,
            engine: Default::default(),
        })
        .unwrap();
        let mem = evmm_virtio::test_utils::memfd_memory(MEM_SIZE);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let backend = BlkBackend::new(&device);
        backend.update_memory(atomic.clone()).unwrap();
        let vring = VringMutex::new(atomic, QSIZE).unwrap();
        let ring = DriverRing::at(0, QSIZE);
        vring.set_queue_size(QSIZE);
        vring
            .set_queue_info(ring.desc, ring.avail, ring.used)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let call_end = call.try_clone().unwrap();
        // SAFETY: `call_end` is a fresh duplicate owned by nobody else; File takes it over.
        let call_file = unsafe { File::from_raw_fd(call_end.into_raw_fd()) };
        vring.set_call(Some(call_file));
        backend.acked_features(backend.features());
        Self {
            mem,
            file,
            backend,
            vring,
            call,
            ring,
        }
    }

    /// Writes `descs` as one chain into the descriptor table and makes it available.
    fn chain(&mut self, descs: &[Desc]) {
        self.ring.add_chain(&self.mem, descs);
    }

    /// A request: header (type, sector), data descriptors, status byte.
    fn request(&mut self, t: u32, sector: u64, data: &[Desc]) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![Desc(HDR, 16, false)];
        descs.extend_from_slice(data);
        descs.push(Desc(STATUS, 1, true));
        self.chain(&descs);
    }

    /// Serves the queue and waits for what the engine has in flight.
    fn serve(&self) -> usize {
        self.backend.serve_queue(0, &self.vring) + self.backend.settle_queue(0)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.ring.used_idx(&self.mem)
    }

    fn used_elem(&self, i: u16) -> (u32, u32) {
        self.ring.used_elem(&self.mem, i)
    }

    /// Whether the call eventfd was signalled (and consumes it).
    fn called(&self) -> bool {
        self.call.read().is_ok()
    }

    fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).unwrap()
    }

    fn metrics(&self) -> evmm_virtio::blk::metrics::BlockQueueSnapshot {
        self.backend.metrics[0].snapshot()
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8 + 1).collect()
}

#[test]
fn out_flush_in_reach_the_file_and_come_back() {
    let mut rig = Rig::new(false);
    let data = pattern(2048);
    rig.mem.write_slice(&data, GuestAddress(DATA)).unwrap();

    rig.request(VIRTIO_BLK_T_OUT, 8, &[Desc(DATA, 2048, false)]);
    assert_eq!(rig.serve(), 1);
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(rig.used_idx(), 1);
    assert_eq!(rig.used_elem(0), (0, 1));
    assert!(rig.called(), "the frontend was not called");

    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(rig.serve(), 1);
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&rig.file_bytes()[8 * 512..8 * 512 + 2048], &data[..]);

    rig.mem
        .write_slice(&[0u8; 2048], GuestAddress(DATA))
        .unwrap();
    rig.request(
        VIRTIO_BLK_T_IN,
        8,
        &[Desc(DATA, 1024, true), Desc(DATA + 1024, 1024, true)],
    );
    assert_eq!(rig.serve(), 1);
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(rig.used_elem(2), (5, 2049));
    let mut back = vec![0u8; 2048];
    rig.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);

    let m = rig.metrics();
    assert_eq!((m.req_out, m.req_flush, m.req_in), (1, 1, 1));
    assert_eq!((m.bytes_written, m.bytes_read), (2048, 2048));
    assert_eq!(m.interrupts, 3);
}

#[test]
fn get_id_answers_the_configured_id() {
    let mut rig = Rig::new(false);
    rig.request(VIRTIO_BLK_T_GET_ID, 0, &[Desc(DATA, 20, true)]);
    assert_eq!(rig.serve(), 1);
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 3];
    rig.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"rig");
}

#[test]
fn several_chains_are_served_in_one_wakeup() {
    let mut rig = Rig::new(false);
    for _ in 0..3 {
        rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    assert_eq!(rig.serve(), 3);
    assert_eq!(rig.used_idx(), 3);
    assert_eq!(rig.metrics().wakeups, 1);
    assert_eq!(rig.metrics().interrupts, 1);
}

#[test]
fn bad_requests_are_answered_and_the_queue_goes_on() {
    let mut rig = Rig::new(false);
    rig.request(0x7777, 0, &[]);
    assert_eq!(rig.serve(), 1);
    assert_eq!(rig.status(), VIRTIO_BLK_S_UNSUPP as u8);
    // Beyond the capacity.
    rig.request(VIRTIO_BLK_T_IN, SECTORS as u64, &[Desc(DATA, 512, true)]);
    assert_eq!(rig.serve(), 1);
    assert_eq!(rig.status(), VIRTIO_BLK_S_IOERR as u8);
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(rig.serve(), 1);
    assert_eq!(rig.status(), VIRTIO_BLK_S_OK as u8);
    assert!(!rig.backend.queue(0).unwrap().is_stopped());
}

#[test]
fn a_readonly_disk_refuses_writes() {
    let mut rig = Rig::new(true);
    rig.mem
        .write_slice(&pattern(512), GuestAddress(DATA))
        .unwrap();
    rig.request(VIRTIO_BLK_T_OUT, 0, &[Desc(DATA, 512, false)]);
    assert_eq!(rig.serve(), 1);
    assert_eq!(rig.status(), VIRTIO_BLK_S_IOERR as u8);
    assert!(rig.file_bytes().iter().all(|&b| b == 0));
}

#[test]
fn a_chain_without_status_stops_the_queue_until_the_ring_is_restarted() {
    let mut rig = Rig::new(false);
    // The last descriptor is device-readable: nowhere to answer.
    rig.chain(&[Desc(HDR, 16, false), Desc(STATUS, 1, false)]);
    assert_eq!(rig.serve(), 0);
    assert_eq!(rig.used_idx(), 0);
    assert!(rig.backend.queue(0).unwrap().is_stopped());
    assert_eq!(rig.metrics().malformed_chains, 1);
    // Kicks on a stopped queue do nothing.
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(rig.serve(), 0);
    // GET_VRING_BASE stops the ring; the next start serves it again.
    rig.backend.stop_vring(0).unwrap();
    assert!(!rig.backend.queue(0).unwrap().is_stopped());
    rig.backend.reset_device();
    assert!(!rig.backend.queue(0).unwrap().is_stopped());
}

#[test]
fn a_disabled_or_unready_vring_is_not_served() {
    let mut rig = Rig::new(false);
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    rig.vring.set_enabled(false);
    assert_eq!(rig.serve(), 0);
    rig.vring.set_enabled(true);
    rig.vring.set_queue_ready(false);
    assert_eq!(rig.serve(), 0);
    rig.vring.set_queue_ready(true);
    assert_eq!(rig.serve(), 1);
}

#[test]
fn event_idx_suppresses_calls_the_driver_does_not_want() {
    let mut rig = Rig::new(false);
    rig.vring.set_queue_event_idx(true);
    // used_event = 5: the driver wants a call only once the used index passes 5.
    rig.ring.set_used_event(&rig.mem, 5);
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(rig.serve(), 1);
    assert!(!rig.called(), "called although used_event says no");
    assert_eq!(rig.metrics().interrupts_suppressed, 1);
    // The device published avail_event for the driver's next kick.
    let avail_event: u16 = rig
        .mem
        .read_obj(GuestAddress(rig.ring.used + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(avail_event, 1);
    // used_event = 1: call when the used index moves past 1, as it does next.
    rig.ring.set_used_event(&rig.mem, 1);
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(rig.serve(), 1);
    assert!(rig.called());
}

#[test]
fn no_interrupt_flag_is_honoured_without_event_idx() {
    let mut rig = Rig::new(false);
    rig.ring.set_avail_flags(
        &rig.mem,
        virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16,
    );
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(rig.serve(), 1);
    assert!(!rig.called());
}

#[test]
fn acked_features_follow_the_frontend_and_reset() {
    let rig = Rig::new(false);
    assert_eq!(rig.backend.acked(), rig.backend.features());
    assert_ne!(rig.backend.features() & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    rig.backend.reset_device();
    assert_eq!(rig.backend.acked(), 0);
}

#[test]
fn queue_layout_and_config_are_the_devices() {
    let rig = Rig::new(false);
    assert_eq!(rig.backend.num_queues(), 2);
    assert_eq!(rig.backend.queues_per_thread(), vec![1, 2]);
    assert_eq!(rig.backend.max_queue_size(), usize::from(QUEUE_SIZE));
    let c = rig.backend.get_config(0, 8);
    assert_eq!(u64::from_le_bytes(c.try_into().unwrap()), SECTORS as u64);
    let nq = rig.backend.get_config(34, 2);
    assert_eq!(nq, vec![2, 0]);
    assert!(rig.backend.get_config(0, 4096).is_empty());
    // Writes are ignored, not errors (an error would end the connection).
    rig.backend.set_config(0, &[1, 2, 3]).unwrap();
    assert_eq!(rig.backend.get_config(0, 8), c_bytes(SECTORS as u64));
}

fn c_bytes(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

#[test]
fn events_the_backend_does_not_know_are_ignored_without_error() {
    let rig = Rig::new(false);
    let vrings = [rig.vring];
    rig.backend
        .handle_event(7, EventSet::IN, &vrings, 0)
        .unwrap();
    rig.backend
        .handle_event(0, EventSet::OUT, &vrings, 0)
        .unwrap();
    rig.backend
        .handle_event(0, EventSet::IN, &vrings, 9)
        .unwrap();
}

#[test]
fn every_worker_thread_gets_an_exit_event() {
    let rig = Rig::new(false);
    for t in 0..2 {
        let (consumer, notifier) = rig.backend.exit_event(t).unwrap();
        notifier.notify().unwrap();
        consumer.consume().unwrap();
    }
}

#[test]
fn a_polling_queue_finds_requests_that_were_not_kicked() {
    // A 1 s window: far longer than the test needs between its two requests.
    let mut rig = Rig::with_poll(false, evmm_virtio::poll::PollMode::Fixed(1_000_000));
    let data = pattern(512);
    rig.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    rig.request(VIRTIO_BLK_T_OUT, 4, &[Desc(DATA, 512, false)]);
    // The driver's side of the ring stays here; the rig goes to the serving thread.
    let mut ring = std::mem::replace(&mut rig.ring, DriverRing::at(0, QSIZE));
    let rig = std::sync::Arc::new(rig);
    let serving = {
        let rig = rig.clone();
        std::thread::spawn(move || rig.backend.serve_queue(0, &rig.vring))
    };
    let waited = std::time::Instant::now();
    while rig.used_idx() != 1 {
        assert!(waited.elapsed().as_secs() < 10, "first request not served");
        std::thread::yield_now();
    }
    // Kicks are off while the thread polls.
    let flags: u16 = rig.mem.read_obj(GuestAddress(rig.ring.used)).unwrap();
    assert_eq!(flags, 1, "VRING_USED_F_NO_NOTIFY");
    // A second request, made available without a kick.
    ring.add_chain(
        &rig.mem,
        &[
            Desc(HDR, 16, false),
            Desc(DATA, 512, false),
            Desc(STATUS, 1, true),
        ],
    );
    while rig.used_idx() != 2 {
        assert!(
            waited.elapsed().as_secs() < 10,
            "second request not found by polling"
        );
        std::thread::yield_now();
    }
    serving.join().unwrap();
    // Back in its event loop, the thread has turned kicks on again.
    let flags: u16 = rig.mem.read_obj(GuestAddress(rig.ring.used)).unwrap();
    assert_eq!(flags, 0);
    let p = rig.backend.poll_metrics.snapshot();
    assert!(p.polled_drains >= 1 && p.polled_requests >= 1, "{p:?}");
    assert_eq!(p.idle_polls, 1, "{p:?}");
    assert_eq!(rig.metrics().wakeups, 1);
}
