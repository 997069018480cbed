//! Helpers shared by the unit tests.

use crate::interrupt::{InterruptKind, InterruptSignal};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// 16 MiB of guest memory at 0.
pub const MEM_SIZE: usize = 16 << 20;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// An InterruptSignal that records what the device did and writes an eventfd.
pub struct RecordingInterrupt {
    pub vring: AtomicU64,
    pub config: AtomicU64,
    pub needs_reset: AtomicBool,
    pub fd: EventFd,
}

impl RecordingInterrupt {
    pub fn new() -> Self {
        Self {
            vring: AtomicU64::new(0),
            config: AtomicU64::new(0),
            needs_reset: AtomicBool::new(false),
            fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }
    pub fn vring(&self) -> u64 {
        self.vring.load(Ordering::SeqCst)
    }
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

impl InterruptSignal for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        match kind {
            InterruptKind::Vring => self.vring.fetch_add(1, Ordering::SeqCst),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        self.fd.write(1)
    }
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        let _ = self.trigger(InterruptKind::Config);
    }
}

/// Waits up to 10 s for `fd` to become readable.
pub fn wait_readable(fd: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    r == 1
}

/// One descriptor of a chain: address, length, device-writable.
#[derive(Clone, Copy)]
pub struct D(pub u64, pub u32, pub bool);

/// Writes `descs` as one chain at descriptor-table index `first` and makes it
/// available.
pub fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, descs: &[D]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let last = i + 1 == descs.len();
            let mut flags = if d.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(d.0, d.1, flags, next))
        })
        .collect();
    vq.add_desc_chains(&raw, first).unwrap();
}

/// A raw descriptor with explicit flags and next.
pub fn raw_desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Where the tests put the used ring (the mock's own used ring overlaps its available
/// ring beyond 8 entries, so it is not used).
pub const USED_ADDR: u64 = 0x1_0000;
/// Queue size used by the tests.
pub const QSIZE: u16 = 16;

/// A ready queue on `vq`'s descriptor table and available ring, with the used ring at
/// [`USED_ADDR`].
pub fn make_queue(vq: &MockSplitQueue<GuestMemoryMmap>) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
    q
}

/// The used ring's idx.
pub fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    use vm_memory::Bytes;
    mem.read_obj(GuestAddress(USED_ADDR + 2)).unwrap()
}

/// The used element `i`: (id, len).
pub fn used_elem(mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
    use vm_memory::Bytes;
    let base = USED_ADDR + 4 + 8 * u64::from(i % QSIZE);
    (
        mem.read_obj(GuestAddress(base)).unwrap(),
        mem.read_obj(GuestAddress(base + 4)).unwrap(),
    )
}

/// Sets the driver's used_event (EVENT_IDX) in the available ring.
pub fn set_used_event(vq: &MockSplitQueue<GuestMemoryMmap>, mem: &GuestMemoryMmap, v: u16) {
    use vm_memory::Bytes;
    let addr = vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    mem.write_obj(v, GuestAddress(addr)).unwrap();
}

/// The device's avail_event (EVENT_IDX) in the used ring.
pub fn avail_event(mem: &GuestMemoryMmap) -> u16 {
    use vm_memory::Bytes;
    mem.read_obj(GuestAddress(USED_ADDR + 4 + 8 * u64::from(QSIZE)))
        .unwrap()
}
