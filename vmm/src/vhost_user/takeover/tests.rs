//! The takeover on mock rings: what a dead backend left pending and what the guest
//! sends afterwards is answered with IOERR.

use super::*;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const QSIZE: u16 = 16;
/// The used ring, away from the mock's (which overlaps its available ring).
const USED: u64 = 0x1_0000;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// What a status byte holds before anyone answered.
const UNTOUCHED: u8 = 0xaa;

struct Irq {
    vring: AtomicU64,
    needs_reset: AtomicBool,
    fd: EventFd,
}

impl Irq {
    fn new() -> Arc<Self> {
        Arc::new(Irq {
            vring: AtomicU64::new(0),
            needs_reset: AtomicBool::new(false),
            fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        })
    }
    fn vring(&self) -> u64 {
        self.vring.load(Ordering::SeqCst)
    }
}

impl InterruptSignal for Irq {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        if kind == InterruptKind::Vring {
            self.vring.fetch_add(1, Ordering::SeqCst);
        }
        self.fd.write(1)
    }
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// A request chain at descriptor `first`: header, 512 bytes of data, status at
/// `status`, made available.
fn add_request(
    vq: &MockSplitQueue<GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    first: u16,
    status: u64,
) {
    mem.write_obj(UNTOUCHED, GuestAddress(status)).unwrap();
    let descs = [
        (0x10_0000, 16, 0),
        (0x20_0000, 512, VRING_DESC_F_WRITE),
        (status, 1, VRING_DESC_F_WRITE),
    ];
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
        })
        .collect();
    vq.add_desc_chains(&raw, first).unwrap();
}

fn status_addr(n: u64) -> u64 {
    0x30_0000 + n
}

fn status(mem: &GuestMemoryMmap, n: u64) -> u8 {
    mem.read_obj(GuestAddress(status_addr(n))).unwrap()
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

fn used_elem(mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
    let base = USED + 4 + 8 * u64::from(i % QSIZE);
    (
        mem.read_obj(GuestAddress(base)).unwrap(),
        mem.read_obj(GuestAddress(base + 4)).unwrap(),
    )
}

/// What a backend leaves when it completed `n` requests and died: used entries and
/// the used idx.
fn backend_completed(mem: &GuestMemoryMmap, heads: &[u32]) {
    for (i, &h) in heads.iter().enumerate() {
        let base = USED + 4 + 8 * i as u64;
        mem.write_obj(h, GuestAddress(base)).unwrap();
        mem.write_obj(1u32, GuestAddress(base + 4)).unwrap();
        mem.write_obj(0u8, GuestAddress(status_addr(i as u64)))
            .unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(USED + 2))
        .unwrap();
}

fn queue(vq: &MockSplitQueue<GuestMemoryMmap>, event_idx: bool) -> TakeoverQueue {
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(event_idx);
    TakeoverQueue {
        index: 0,
        queue: q,
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
    }
}

/// A takeover of `queue` on `mem`, with a fresh interrupt and fresh counters.
fn takeover(
    mem: &GuestMemoryMmap,
    queue: TakeoverQueue,
) -> (Takeover, Arc<Irq>, Arc<TakeoverStats>) {
    let irq = Irq::new();
    let stats = Arc::new(TakeoverStats::default());
    let t = Takeover::new("test", mem.clone(), vec![queue], irq.clone(), stats.clone());
    (t, irq, stats)
}

#[test]
fn pending_requests_are_answered_with_ioerr_where_the_backend_stopped() {
    let mem = mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    for n in 0..4u16 {
        add_request(&vq, &mem, 3 * n, status_addr(u64::from(n)));
    }
    // The backend completed the first request (head 0), took the second and died.
    backend_completed(&mem, &[0]);
    let q = queue(&vq, false);
    q.kick.write(1).unwrap();
    let (mut t, irq, stats) = takeover(&mem, q);
    assert_eq!(t.begin(), 3);

    assert_eq!(status(&mem, 0), 0, "completed by the backend: untouched");
    for n in 1..4 {
        assert_eq!(status(&mem, n), IOERR, "request {n}");
    }
    assert_eq!(used_idx(&mem), 4);
    assert_eq!(used_elem(&mem, 0), (0, 1));
    for n in 1..4u16 {
        assert_eq!(used_elem(&mem, n), (u32::from(3 * n), 1));
    }
    // One interrupt for the used entries, one unconditional at the start.
    assert_eq!(irq.vring(), 2);
    assert!(!irq.needs_reset.load(Ordering::SeqCst));
    let s = stats.snapshot();
    assert_eq!(s.requests_failed, 3);
    assert_eq!(s.kicks, 1);
    assert_eq!(s.interrupts, 2);

    // A later request, then nothing new: drain answers one, then none.
    add_request(&vq, &mem, 12, status_addr(4));
    assert_eq!(t.drain(0), 1);
    assert_eq!(status(&mem, 4), IOERR);
    assert_eq!(used_idx(&mem), 5);
    assert_eq!(t.drain(0), 0);
    assert_eq!(stats.snapshot().requests_failed, 4);
    // Out-of-range slots are ignored.
    assert_eq!(t.drain(7), 0);
}

#[test]
fn the_thread_answers_kicked_requests_and_stops() {
    let mem = mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let q = queue(&vq, true);
    let kick = q.kick.try_clone().unwrap();
    let (t, irq, stats) = takeover(&mem, q);
    let handle = t.spawn().unwrap();
    // The unconditional first interrupt.
    assert!(wait_readable(&irq.fd));
    irq.fd.read().unwrap();
    add_request(&vq, &mem, 0, status_addr(0));
    kick.write(1).unwrap();
    assert!(
        wait_readable(&irq.fd),
        "no interrupt for the kicked request"
    );
    assert_eq!(status(&mem, 0), IOERR);
    assert_eq!(used_idx(&mem), 1);
    handle.stop();
    let s = stats.snapshot();
    assert_eq!(s.requests_failed, 1);
    assert_eq!(s.kicks, 1);
    // EVENT_IDX: the device re-armed avail_event at its next_avail.
    let avail_event: u16 = mem
        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(avail_event, 1);
}

#[test]
fn event_idx_and_no_interrupt_suppress_interrupts() {
    // EVENT_IDX with used_event far ahead: no interrupt for the used entry.
    let mem = mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    add_request(&vq, &mem, 0, status_addr(0));
    let used_event = vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    mem.write_obj(10u16, GuestAddress(used_event)).unwrap();
    let (mut t, irq, stats) = takeover(&mem, queue(&vq, true));
    assert_eq!(t.drain(0), 1);
    assert_eq!(irq.vring(), 0);
    assert_eq!(stats.snapshot().interrupts_suppressed, 1);

    // No EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT set by the driver.
    let mem = super::tests::mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    add_request(&vq, &mem, 0, status_addr(0));
    mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, vq.avail_addr())
        .unwrap();
    let (mut t, irq, _) = takeover(&mem, queue(&vq, false));
    assert_eq!(t.drain(0), 1);
    assert_eq!(irq.vring(), 0);
    assert_eq!(status(&mem, 0), IOERR);
    // Without the flag: an interrupt.
    mem.write_obj(0u16, vq.avail_addr()).unwrap();
    add_request(&vq, &mem, 3, status_addr(1));
    assert_eq!(t.drain(0), 1);
    assert_eq!(irq.vring(), 1);
}

#[test]
fn a_chain_without_a_status_byte_stops_the_queue_with_needs_reset() {
    let mem = mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    // A single device-readable descriptor: nowhere to answer.
    vq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            0x10_0000, 16, 0, 0,
        ))],
        0,
    )
    .unwrap();
    add_request(&vq, &mem, 1, status_addr(1));
    let (mut t, irq, stats) = takeover(&mem, queue(&vq, false));
    assert_eq!(t.drain(0), 0);
    assert!(irq.needs_reset.load(Ordering::SeqCst));
    assert_eq!(stats.snapshot().malformed_chains, 1);
    assert_eq!(used_idx(&mem), 0);
    // The queue is stopped: nothing more is answered until a reset.
    assert_eq!(t.drain(0), 0);
    assert_eq!(status(&mem, 1), UNTOUCHED);
}

#[test]
fn a_used_ring_outside_memory_stops_the_queue() {
    let mem = mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let mut q = queue(&vq, false);
    q.queue.set_used_ring_address(Some(0xffff_0000), Some(0));
    let (mut t, irq, stats) = takeover(&mem, q);
    assert!(irq.needs_reset.load(Ordering::SeqCst));
    assert_eq!(t.drain(0), 0);
    assert_eq!(stats.snapshot().malformed_chains, 1);
}

fn wait_readable(fd: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    r == 1
}
