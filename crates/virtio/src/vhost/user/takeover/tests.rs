//! The takeover on mock rings: what a dead backend left pending and what the guest
//! sends afterwards is answered with IOERR (the block device's answer).

use super::*;
use crate::test_utils::{
    add_chain, avail_event, guest_memory, make_queue, raw_desc, set_avail_flags, set_used_event,
    used_elem, used_idx, wait_readable, Desc, RecordingInterrupt, QSIZE, USED_ADDR as USED,
};
use crate::vhost::blk::BlkKind;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// What a status byte holds before anyone answered.
const UNTOUCHED: u8 = 0xaa;

fn mem() -> GuestMemoryMmap {
    guest_memory()
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
    add_chain(
        vq,
        first,
        &[
            Desc(0x10_0000, 16, false),
            Desc(0x20_0000, 512, true),
            Desc(status, 1, true),
        ],
    );
}

fn status_addr(n: u64) -> u64 {
    0x30_0000 + n
}

fn status(mem: &GuestMemoryMmap, n: u64) -> u8 {
    mem.read_obj(GuestAddress(status_addr(n))).unwrap()
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

fn queue(vq: &MockSplitQueue<GuestMemoryMmap>, event_idx: bool) -> ReadyQueue {
    let mut q = make_queue(vq);
    q.set_event_idx(event_idx);
    ReadyQueue {
        index: 0,
        queue: q,
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
    }
}

/// A takeover of `queue` on `mem`, with a fresh interrupt and fresh counters.
fn takeover(
    mem: &GuestMemoryMmap,
    queue: ReadyQueue,
) -> (
    Takeover<BlkKind>,
    Arc<RecordingInterrupt>,
    Arc<TakeoverStats>,
) {
    let irq = Arc::new(RecordingInterrupt::new());
    let stats = Arc::new(TakeoverStats::default());
    let t = Takeover::new(
        "test",
        Arc::new(BlkKind),
        mem.clone(),
        vec![queue],
        irq.clone(),
        stats.clone(),
    );
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
    assert!(!irq.needs_reset());
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
    assert_eq!(avail_event(&mem), 1);
}

#[test]
fn event_idx_and_no_interrupt_suppress_interrupts() {
    // EVENT_IDX with used_event far ahead: no interrupt for the used entry.
    let mem = mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    add_request(&vq, &mem, 0, status_addr(0));
    set_used_event(&vq, &mem, 10);
    let (mut t, irq, stats) = takeover(&mem, queue(&vq, true));
    assert_eq!(t.drain(0), 1);
    assert_eq!(irq.vring(), 0);
    assert_eq!(stats.snapshot().interrupts_suppressed, 1);

    // No EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT set by the driver.
    let mem = super::tests::mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    add_request(&vq, &mem, 0, status_addr(0));
    set_avail_flags(&vq, &mem, VRING_AVAIL_F_NO_INTERRUPT as u16);
    let (mut t, irq, _) = takeover(&mem, queue(&vq, false));
    assert_eq!(t.drain(0), 1);
    assert_eq!(irq.vring(), 0);
    assert_eq!(status(&mem, 0), IOERR);
    // Without the flag: an interrupt.
    set_avail_flags(&vq, &mem, 0);
    add_request(&vq, &mem, 3, status_addr(1));
    assert_eq!(t.drain(0), 1);
    assert_eq!(irq.vring(), 1);
}

#[test]
fn a_chain_without_a_status_byte_stops_the_queue_with_needs_reset() {
    let mem = mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    // A single device-readable descriptor: nowhere to answer.
    vq.add_desc_chains(&[raw_desc(0x10_0000, 16, 0, 0)], 0)
        .unwrap();
    add_request(&vq, &mem, 1, status_addr(1));
    let (mut t, irq, stats) = takeover(&mem, queue(&vq, false));
    assert_eq!(t.drain(0), 0);
    assert!(irq.needs_reset());
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
    assert!(irq.needs_reset());
    assert_eq!(t.drain(0), 0);
    assert_eq!(stats.snapshot().malformed_chains, 1);
}
