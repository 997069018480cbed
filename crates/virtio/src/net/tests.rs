//! Unit tests of virtio-net on mock queues, with a datagram socket pair standing in
//! for the tap (one datagram = one frame, as on a tap) or a tap that fails on demand:
//! transmit chains to frames, frames into single and mergeable receive buffers, frames
//! larger than what was posted, malformed chains, EAGAIN and EIO, and the device end
//! to end on its worker thread.

use super::config::{HDR_LEN, HDR_NUM_BUFFERS};
use super::metrics::NetQueueMetrics;
use super::rx::{ask_for_more_buffers, Received, Receiver};
use super::tap::{fd_readv, fd_writev, TapError, TapQueue};
use super::tx::Transmitter;
use super::*;
use crate::device::{ActivateContext, VirtioDevice};
use crate::fault::FaultLog;
use crate::test_utils::*;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_net::*;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// One end of a datagram socket pair as a tap queue, the test holding the other end
/// (the "network"). `fail` > 0 makes reads and writes fail with that errno.
struct SocketTap {
    sock: UnixDatagram,
    fail: AtomicI32,
}

impl AsRawFd for SocketTap {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl SocketTap {
    fn failure(&self) -> Option<io::Error> {
        match self.fail.load(Ordering::SeqCst) {
            0 => None,
            errno => Some(io::Error::from_raw_os_error(errno)),
        }
    }
}

impl TapQueue for SocketTap {
    fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        match self.failure() {
            Some(e) => Err(e),
            None => fd_readv(self.sock.as_raw_fd(), iovs),
        }
    }
    fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        match self.failure() {
            Some(e) => Err(e),
            None => fd_writev(self.sock.as_raw_fd(), iovs),
        }
    }
    fn set_offloads(&self, _: u32) -> Result<(), TapError> {
        Ok(())
    }
    fn set_queue_enabled(&self, _: bool) -> Result<(), TapError> {
        Ok(())
    }
}

/// A tap queue and the network end of it.
fn tap_pair() -> (SocketTap, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (
        SocketTap {
            sock: a,
            fail: AtomicI32::new(0),
        },
        b,
    )
}

const BUF: u64 = 0x10_0000;

/// A frame with a virtio-net header: `len` bytes of payload after it.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

fn faults() -> FaultLog {
    FaultLog::new("virtio-net")
}

// ---- transmit ----

#[test]
fn a_transmit_chain_goes_out_as_one_frame_header_included() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, net) = tap_pair();
    let mut f = frame(1000, 1);
    // An offload header goes through unchanged.
    f[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    f[6] = 34;
    f[8] = 6;
    mem.write_slice(&f[..100], GuestAddress(BUF)).unwrap();
    mem.write_slice(&f[100..], GuestAddress(BUF + 0x1000))
        .unwrap();
    add_chain(
        &vq,
        0,
        &[
            Desc(BUF, 100, false),
            Desc(BUF + 0x1000, (f.len() - 100) as u32, false),
        ],
    );
    let mut q = make_queue(&vq);
    let m = NetQueueMetrics::default();
    let d = Transmitter::default().transmit(&mut q, &mem, &tap, 1, &m, &faults());
    assert_eq!((d.added, d.blocked, d.fault), (1, false, None));
    let mut got = vec![0u8; 4096];
    let n = net.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
    assert_eq!(used_elem(&mem, 0), (0, 0));
    let s = m.snapshot();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, 1000));
}

#[test]
fn a_full_tap_keeps_the_frame_for_later_and_a_refusing_one_drops_it() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, net) = tap_pair();
    mem.write_slice(&frame(60, 2), GuestAddress(BUF)).unwrap();
    add_chain(&vq, 0, &[Desc(BUF, 72, false)]);
    add_chain(&vq, 1, &[Desc(BUF, 72, false)]);
    let mut q = make_queue(&vq);
    let m = NetQueueMetrics::default();
    let mut tx = Transmitter::default();

    tap.fail.store(libc::EAGAIN, Ordering::SeqCst);
    let d = tx.transmit(&mut q, &mem, &tap, 1, &m, &faults());
    assert!(d.blocked);
    assert_eq!((d.added, q.next_avail()), (0, 0), "the frame waits");
    assert_eq!(m.snapshot().tx_waits_for_tap, 1);

    tap.fail.store(libc::EIO, Ordering::SeqCst);
    let d = tx.transmit(&mut q, &mem, &tap, 1, &m, &faults());
    assert_eq!(
        (d.added, d.blocked),
        (2, false),
        "link down: dropped, returned"
    );
    assert_eq!(m.snapshot().tx_dropped_tap_error, 2);
    assert!(net.recv(&mut [0u8; 128]).is_err(), "nothing was sent");
}

#[test]
fn malformed_transmit_chains_are_returned_unsent() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, net) = tap_pair();
    // A device-writable buffer; one shorter than the header; one outside memory.
    add_chain(&vq, 0, &[Desc(BUF, 72, true)]);
    add_chain(&vq, 1, &[Desc(BUF, 8, false)]);
    add_chain(&vq, 2, &[Desc(MEM_SIZE as u64 + 0x1000, 72, false)]);
    let mut q = make_queue(&vq);
    let m = NetQueueMetrics::default();
    let d = Transmitter::default().transmit(&mut q, &mem, &tap, 1, &m, &faults());
    assert_eq!((d.added, d.fault), (3, None));
    assert_eq!(m.snapshot().malformed_chains, 3);
    assert!(net.recv(&mut [0u8; 128]).is_err());
}

// ---- receive ----

fn receive(
    rx: &mut Receiver,
    q: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
    tap: &SocketTap,
    m: &NetQueueMetrics,
) -> Received {
    rx.receive(q, mem, tap, 0, m, &faults())
}

#[test]
fn a_frame_fills_one_buffer_with_num_buffers_1() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, net) = tap_pair();
    mem.write_slice(&[0xaa; 2048], GuestAddress(BUF)).unwrap();
    add_chain(&vq, 0, &[Desc(BUF, 2048, true)]);
    let mut q = make_queue(&vq);
    let m = NetQueueMetrics::default();
    let mut rx = Receiver::new(false, 1530);
    let f = frame(1000, 3);
    net.send(&f).unwrap();
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::Frame
    ));
    assert_eq!(used_idx(&mem), 1);
    assert_eq!(used_elem(&mem, 0), (0, f.len() as u32));
    let mut got = vec![0u8; f.len()];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(&got[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2], &[1, 0]);
    assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
    assert_eq!(m.snapshot().rx_bytes, 1000);
    // Nothing more to read; then no buffer left.
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::NoBuffers
    ));
    add_chain(&vq, 1, &[Desc(BUF, 2048, true)]);
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::TapEmpty
    ));
    assert_eq!(q.next_avail(), 1, "the buffer stays posted");
}

#[test]
fn mergeable_buffers_take_a_large_frame_published_at_once() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, net) = tap_pair();
    for i in 0..4u16 {
        add_chain(&vq, i, &[Desc(BUF + 0x1000 * u64::from(i), 1024, true)]);
    }
    let mut q = make_queue(&vq);
    let m = NetQueueMetrics::default();
    let mut rx = Receiver::new(true, 4096);
    let f = frame(2500 - HDR_LEN, 4);
    net.send(&f).unwrap();
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::Frame
    ));
    assert_eq!(used_idx(&mem), 3, "three buffers, one store of the index");
    let lens: Vec<u32> = (0..3).map(|i| used_elem(&mem, i).1).collect();
    assert_eq!(lens, [1024, 1024, 452]);
    let mut first = [0u8; 12];
    mem.read_slice(&mut first, GuestAddress(BUF)).unwrap();
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3);
    let mut tail = vec![0u8; 452];
    mem.read_slice(&mut tail, GuestAddress(BUF + 0x2000))
        .unwrap();
    assert_eq!(&tail[..], &f[2048..]);
    assert_eq!(q.next_avail(), 3, "the fourth buffer stays posted");
}

/// A driver still refilling its ring: with mergeable buffers that cannot yet hold the
/// largest frame, nothing is read (the frame waits in the tap, it is not dropped), the
/// driver is asked for a kick past what it has posted, and once it has posted enough
/// the frame goes in. With the whole ring posted the device reads whatever it holds.
#[test]
fn mergeable_buffers_too_few_for_the_largest_frame_make_the_frame_wait() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, net) = tap_pair();
    for i in 0..2u16 {
        add_chain(&vq, i, &[Desc(BUF + 0x1000 * u64::from(i), 1024, true)]);
    }
    let mut q = make_queue(&vq);
    q.set_event_idx(true);
    let m = NetQueueMetrics::default();
    let mut rx = Receiver::new(true, 4096);
    let f = frame(1500, 8);
    net.send(&f).unwrap();
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::TooFewBuffers { posted: 2 }
    ));
    assert_eq!((used_idx(&mem), q.next_avail()), (0, 0), "nothing taken");
    assert!(!ask_for_more_buffers(&mut q, &mem, 2).unwrap());
    assert_eq!(avail_event(&mem), 2, "a kick once the driver posts past 2");
    assert_eq!(q.next_avail(), 0);
    for i in 2..4u16 {
        add_chain(&vq, i, &[Desc(BUF + 0x1000 * u64::from(i), 1024, true)]);
    }
    // The driver posted after the device looked and before it asked for a kick.
    assert!(
        ask_for_more_buffers(&mut q, &mem, 2).unwrap(),
        "posted meanwhile"
    );
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::Frame
    ));
    assert_eq!(used_elem(&mem, 0), (0, 1024));
    assert_eq!(used_elem(&mem, 1), (1, f.len() as u32 - 1024));
    assert_eq!(m.snapshot().rx_dropped_too_big, 0);

    // A small ring, all of it posted: read, and a frame too big for it is dropped.
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, 2);
    for i in 0..2u16 {
        add_chain(&vq, i, &[Desc(BUF + 0x1000 * u64::from(i), 1024, true)]);
    }
    let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
    net.send(&frame(3000, 9)).unwrap();
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::Dropped
    ));
    assert_eq!(m.snapshot().rx_dropped_too_big, 1);
}

#[test]
fn a_read_shorter_than_the_header_is_a_tap_error_and_the_buffers_stay() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, net) = tap_pair();
    add_chain(&vq, 0, &[Desc(BUF, 1530, true)]);
    let mut q = make_queue(&vq);
    let m = NetQueueMetrics::default();
    let mut rx = Receiver::new(false, 1530);
    net.send(&[1, 2, 3, 4, 5]).unwrap();
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::Dropped
    ));
    assert_eq!((used_idx(&mem), q.next_avail()), (0, 0));
    let s = m.snapshot();
    assert_eq!((s.tap_errors, s.rx_dropped_too_big), (1, 0));
}

#[test]
fn a_frame_larger_than_the_posted_buffers_is_dropped_and_the_buffers_stay() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, net) = tap_pair();
    add_chain(&vq, 0, &[Desc(BUF, 1530, true)]);
    let mut q = make_queue(&vq);
    let m = NetQueueMetrics::default();
    let mut rx = Receiver::new(false, 1530);
    net.send(&frame(3000, 5)).unwrap();
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::Dropped
    ));
    assert_eq!((used_idx(&mem), q.next_avail()), (0, 0));
    assert_eq!(m.snapshot().rx_dropped_too_big, 1);
    net.send(&frame(100, 6)).unwrap();
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::Frame
    ));
    assert_eq!(used_elem(&mem, 0), (0, 112));
}

#[test]
fn a_malformed_receive_chain_is_returned_empty_and_the_next_one_used() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, net) = tap_pair();
    add_chain(&vq, 0, &[Desc(BUF, 2048, false)]);
    add_chain(&vq, 1, &[Desc(BUF + 0x1000, 4, true)]);
    add_chain(&vq, 2, &[Desc(BUF + 0x2000, 2048, true)]);
    let mut q = make_queue(&vq);
    let m = NetQueueMetrics::default();
    let mut rx = Receiver::new(false, 1530);
    net.send(&frame(64, 7)).unwrap();
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::Frame
    ));
    assert_eq!(used_idx(&mem), 3);
    assert_eq!(used_elem(&mem, 0), (0, 0));
    assert_eq!(used_elem(&mem, 1), (1, 0));
    assert_eq!(used_elem(&mem, 2), (2, 76));
    assert_eq!(m.snapshot().malformed_chains, 2);
}

#[test]
fn a_failing_tap_is_reported() {
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let (tap, _net) = tap_pair();
    add_chain(&vq, 0, &[Desc(BUF, 2048, true)]);
    let mut q = make_queue(&vq);
    let m = NetQueueMetrics::default();
    let mut rx = Receiver::new(false, 1530);
    tap.fail.store(libc::EIO, Ordering::SeqCst);
    assert!(matches!(
        receive(&mut rx, &mut q, &mem, &tap, &m),
        Received::TapFailed(e) if e.raw_os_error() == Some(libc::EIO)
    ));
    assert_eq!(q.next_avail(), 0);
}

#[test]
fn macs_parse_strictly() {
    assert_eq!(
        parse_mac("52:54:00:ab:CD:0f"),
        Some([0x52, 0x54, 0, 0xab, 0xcd, 0x0f])
    );
    for bad in [
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:0f:00",
        "5:54:00:ab:cd:0f",
        "zz:54:00:ab:cd:0f",
        "",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad}");
    }
    assert_eq!(default_mac(1, 0x1234)[..3], [0x52, 0x54, 0]);
    assert_ne!(default_mac(1, 7), default_mac(2, 7));
}

// ---- the device on its worker thread ----

#[test]
fn the_worker_moves_frames_both_ways_and_interrupts() {
    let mem = guest_memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), QSIZE);
    let (tap, net) = tap_pair();
    let config = NetConfig {
        mac: [0x52, 0x54, 0, 0, 0, 1],
        queue_pairs: 1,
        mtu: None,
        poll_us: 0,
    };
    let mut dev = Net::new(config, "test0", vec![tap]).unwrap();
    assert_eq!(dev.queue_max_sizes().len(), 2);
    let mut mac = [0u8; 6];
    dev.read_config(0, &mut mac);
    assert_eq!(mac, [0x52, 0x54, 0, 0, 0, 1]);

    add_chain(&rxq, 0, &[Desc(BUF, 2048, true)]);
    let mut rx = make_queue(&rxq);
    rx.set_used_ring_address(Some(0x2_0000), Some(0));
    let mut tx = make_queue(&txq);
    tx.set_used_ring_address(Some(0x6_0000), Some(0));
    let irq = Arc::new(RecordingInterrupt::new());
    let kicks = [
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    let features = dev.avail_features() & !(1 << VIRTIO_NET_F_MRG_RXBUF);
    dev.activate(ActivateContext {
        mem: mem.clone(),
        acked_features: features,
        queues: vec![rx, tx],
        kicks: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        interrupt: irq.clone(),
    })
    .unwrap();
    assert!(dev.is_active());

    // In: the network sends, the guest's buffer gets it and an interrupt.
    let f = frame(200, 8);
    net.send(&f).unwrap();
    assert!(wait_readable(&irq.fd));
    irq.fd.read().unwrap();
    let used: u16 = mem.read_obj(GuestAddress(0x2_0002)).unwrap();
    assert_eq!(used, 1);

    // Out: the guest posts a frame and kicks.
    let out = frame(300, 9);
    mem.write_slice(&out, GuestAddress(BUF + 0x10_0000))
        .unwrap();
    add_chain(&txq, 0, &[Desc(BUF + 0x10_0000, out.len() as u32, false)]);
    kicks[1].write(1).unwrap();
    assert!(wait_readable(&net));
    let mut got = vec![0u8; 1024];
    let n = net.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &out[..]);

    // The worker counts a frame after it has gone out.
    let counted = || {
        let q = &dev.metrics_snapshot().queues[0];
        (q.rx_packets, q.tx_packets, q.tx_kicks) == (1, 1, 1)
    };
    assert!(eventually(counted), "{:?}", dev.metrics_snapshot());
    assert_eq!(dev.metrics_snapshot().tap, "test0");
    dev.reset();
    assert!(!dev.is_active());
}
