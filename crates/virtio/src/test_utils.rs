//! Test helpers for devices on guest memory, public behind the `test-utils` feature so
//! that the unit tests here, the vhost-user-blk daemon's tests, evmm's tests and the
//! criterion bench build descriptor chains one way: a guest memory, descriptor chains
//! on virtio-queue's `MockSplitQueue` with the used ring at [`USED_ADDR`], readers of the
//! used ring, and an interrupt that records what a device raised.

use crate::interrupt::{InterruptKind, InterruptSignal};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// 16 MiB of guest memory at 0.
pub const MEM_SIZE: usize = 16 << 20;

/// [`MEM_SIZE`] of anonymous guest memory at 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// `size` bytes of guest memory at 0 backed by a sealed memfd, as a VMM shares it with a
/// vhost-user backend.
pub fn memfd_memory(size: usize) -> GuestMemoryMmap {
    let file = crate::vhost::shared_memory::sealed_memfd(c"evmm-test-ram", size as u64)
        .expect("a sealed memfd");
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        size,
        Some(vm_memory::FileOffset::new(file, 0)),
    )])
    .unwrap()
}

/// An InterruptSignal that records what the device did and writes an eventfd.
pub struct RecordingInterrupt {
    /// Used-buffer interrupts raised.
    pub vring: AtomicU64,
    /// Configuration interrupts raised.
    pub config: AtomicU64,
    /// Whether the device asked for a reset.
    pub needs_reset: AtomicBool,
    /// Written on every interrupt.
    pub fd: EventFd,
}

impl Default for RecordingInterrupt {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordingInterrupt {
    /// Nothing recorded yet.
    pub fn new() -> Self {
        Self {
            vring: AtomicU64::new(0),
            config: AtomicU64::new(0),
            needs_reset: AtomicBool::new(false),
            fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }
    /// Used-buffer interrupts raised so far.
    pub fn vring(&self) -> u64 {
        self.vring.load(Ordering::SeqCst)
    }
    /// Whether the device asked for a reset.
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

    fn call_eventfd(&self) -> Option<&EventFd> {
        Some(&self.fd)
    }
}

/// Waits up to 10 s for `fd` to become readable.
pub fn wait_readable(fd: &impl AsRawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    r == 1
}

/// Polls `done` every millisecond for up to 10 s: for counters a worker thread bumps
/// just after the effect a test can see (a frame on the wire, an interrupt).
pub fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

/// One descriptor of a chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Desc(pub u64, pub u32, pub bool);

/// Writes `descs` as one chain at descriptor-table index `first` and makes it
/// available.
pub fn add_chain<M: GuestMemory>(vq: &MockSplitQueue<M>, first: u16, descs: &[Desc]) {
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
pub fn make_queue<M: GuestMemory>(vq: &MockSplitQueue<M>) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
    q.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
    q
}

/// The used ring's idx.
pub fn used_idx<M: GuestMemory>(mem: &M) -> u16 {
    use vm_memory::Bytes;
    mem.read_obj(GuestAddress(USED_ADDR + 2)).unwrap()
}

/// The used element `i`: (id, len).
pub fn used_elem<M: GuestMemory>(mem: &M, i: u16) -> (u32, u32) {
    use vm_memory::Bytes;
    let base = USED_ADDR + 4 + 8 * u64::from(i % QSIZE);
    (
        mem.read_obj(GuestAddress(base)).unwrap(),
        mem.read_obj(GuestAddress(base + 4)).unwrap(),
    )
}

/// Sets the driver's used_event (EVENT_IDX) in the available ring.
pub fn set_used_event<M: GuestMemory>(vq: &MockSplitQueue<M>, mem: &M, v: u16) {
    use vm_memory::Bytes;
    let addr = vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    mem.write_obj(v, GuestAddress(addr)).unwrap();
}

/// The device's avail_event (EVENT_IDX) in the used ring.
pub fn avail_event<M: GuestMemory>(mem: &M) -> u16 {
    use vm_memory::Bytes;
    mem.read_obj(GuestAddress(USED_ADDR + 4 + 8 * u64::from(QSIZE)))
        .unwrap()
}

/// Sets the available ring's flags (e.g. VRING_AVAIL_F_NO_INTERRUPT).
pub fn set_avail_flags<M: GuestMemory>(vq: &MockSplitQueue<M>, mem: &M, flags: u16) {
    use vm_memory::Bytes;
    mem.write_obj(flags, vq.avail_addr()).unwrap();
}

/// A split ring as a driver writes it, at addresses the test chooses: for a backend
/// that is told where the rings are (over vhost-user, or by `set_queue_info`).
/// Descriptors are allocated one after the other, wrapping at the ring's size.
#[derive(Debug, Clone)]
pub struct DriverRing {
    /// The descriptor table.
    pub desc: u64,
    /// The available ring.
    pub avail: u64,
    /// The used ring.
    pub used: u64,
    /// The queue size.
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl DriverRing {
    /// A ring of `size` with its three parts at `desc`, `desc + 0x1000` and
    /// `desc + 0x2000` (room for up to 256 entries).
    pub fn at(desc: u64, size: u16) -> Self {
        Self::new(desc, desc + 0x1000, desc + 0x2000, size)
    }

    /// A ring of `size` with its parts where given.
    pub fn new(desc: u64, avail: u64, used: u64, size: u16) -> Self {
        Self {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The ring of a virtio-queue `MockSplitQueue` (its descriptor table and available
    /// ring) with the used ring at [`USED_ADDR`].
    pub fn of_mock<M: GuestMemory>(vq: &MockSplitQueue<M>) -> Self {
        Self::new(vq.desc_table_addr().0, vq.avail_addr().0, USED_ADDR, QSIZE)
    }

    /// Zeroes the ring in `mem` and starts over.
    pub fn clear<M: GuestMemory>(&mut self, mem: &M) {
        use vm_memory::Bytes;
        mem.write_slice(&[0u8; 0x3000], GuestAddress(self.desc))
            .unwrap();
        self.next_desc = 0;
        self.avail_idx = 0;
    }

    /// Writes `descs` as one chain and makes it available; returns its head.
    pub fn add_chain<M: GuestMemory>(&mut self, mem: &M, descs: &[Desc]) -> u16 {
        use vm_memory::Bytes;
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = if d.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = self.desc + 16 * u64::from(index);
            mem.write_obj(d.0, GuestAddress(at)).unwrap();
            mem.write_obj(d.1, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj((index + 1) % self.size, GuestAddress(at + 14))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Chains made available so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The driver's used_event (EVENT_IDX): interrupt me once entry `v` is used.
    pub fn set_used_event<M: GuestMemory>(&self, mem: &M, v: u16) {
        use vm_memory::Bytes;
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    /// The available ring's flags (e.g. VRING_AVAIL_F_NO_INTERRUPT).
    pub fn set_avail_flags<M: GuestMemory>(&self, mem: &M, flags: u16) {
        use vm_memory::Bytes;
        mem.write_obj(flags, GuestAddress(self.avail)).unwrap();
    }

    /// The used ring's idx.
    pub fn used_idx<M: GuestMemory>(&self, mem: &M) -> u16 {
        use vm_memory::Bytes;
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i`: (head, length).
    pub fn used_elem<M: GuestMemory>(&self, mem: &M, i: u16) -> (u32, u32) {
        use vm_memory::Bytes;
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// A driver's side of the virtio-mmio register file, as tests play it.
pub mod mmio_driver {
    use super::DriverRing;
    use crate::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
    use crate::transport::mmio::*;

    /// ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK: a live device.
    pub const LIVE: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

    /// A 32-bit register read (0xff bytes stay where the transport wrote nothing).
    pub fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0xffu8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    /// A 32-bit register write.
    pub fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// The 64 feature bits the device offers.
    pub fn offered_features(t: &mut MmioTransport) -> u64 {
        w32(t, DEVICE_FEATURES_SEL, 0);
        let lo = r32(t, DEVICE_FEATURES);
        w32(t, DEVICE_FEATURES_SEL, 1);
        let hi = r32(t, DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Writes the driver's features (both words).
    pub fn ack_features(t: &mut MmioTransport, f: u64) {
        w32(t, DRIVER_FEATURES_SEL, 0);
        w32(t, DRIVER_FEATURES, f as u32);
        w32(t, DRIVER_FEATURES_SEL, 1);
        w32(t, DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, the features, FEATURES_OK.
    pub fn negotiate(t: &mut MmioTransport, features: u64) {
        w32(t, STATUS, ACKNOWLEDGE);
        w32(t, STATUS, ACKNOWLEDGE | DRIVER);
        ack_features(t, features);
        w32(t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    /// Sets queue `index` up on `ring` and makes it ready.
    pub fn setup_queue(t: &mut MmioTransport, index: u32, ring: &DriverRing) {
        w32(t, QUEUE_SEL, index);
        w32(t, QUEUE_NUM, u32::from(ring.size));
        for (low, addr) in [
            (QUEUE_DESC_LOW, ring.desc),
            (QUEUE_DRIVER_LOW, ring.avail),
            (QUEUE_DEVICE_LOW, ring.used),
        ] {
            w32(t, low, addr as u32);
            w32(t, low + 4, (addr >> 32) as u32);
        }
        w32(t, QUEUE_READY, 1);
    }

    /// Negotiates `features`, sets queue `i` up on `rings[i]`, sets DRIVER_OK.
    pub fn init(t: &mut MmioTransport, features: u64, rings: &[(u32, &DriverRing)]) {
        negotiate(t, features);
        for (index, ring) in rings {
            setup_queue(t, *index, ring);
        }
        w32(t, STATUS, LIVE);
    }
}

/// Counting the log lines a piece of code emits, per thread (tests run in parallel and
/// share one logger).
pub mod log_lines {
    use std::cell::Cell;

    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        static WARN_OR_WORSE: Cell<u64> = const { Cell::new(0) };
        /// Lines at `warn` or above by where they were logged (file:line).
        static BY_SITE: RefCell<BTreeMap<String, u64>> = const { RefCell::new(BTreeMap::new()) };
    }

    struct Counter;

    impl log::Log for Counter {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            if record.level() <= log::Level::Warn {
                WARN_OR_WORSE.with(|c| c.set(c.get() + 1));
                let site = format!(
                    "{}:{}",
                    record.file().unwrap_or("?"),
                    record.line().unwrap_or(0)
                );
                BY_SITE.with(|m| *m.borrow_mut().entry(site).or_default() += 1);
            }
        }
        fn flush(&self) {}
    }

    static COUNTER: Counter = Counter;

    /// The call sites that logged at `warn` or above on this thread, most lines first.
    pub fn busiest_sites() -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> =
            BY_SITE.with(|m| m.borrow().iter().map(|(k, v)| (k.clone(), *v)).collect());
        v.sort_by_key(|s| std::cmp::Reverse(s.1));
        v
    }

    /// Runs `f` and returns how many lines at `warn` or above it logged on this thread.
    /// Installs a counting logger for the whole test binary on first use; it fails (and
    /// so does the test) if the binary installed another logger.
    pub fn warnings_of(f: impl FnOnce()) -> u64 {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            log::set_logger(&COUNTER).expect("another logger is installed");
            log::set_max_level(log::LevelFilter::Warn);
        });
        let before = WARN_OR_WORSE.with(Cell::get);
        f();
        WARN_OR_WORSE.with(Cell::get) - before
    }
}

/// A small seeded generator (splitmix64) for generated hostile inputs: a failing seed
/// replays exactly.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    /// The generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// How many seeds a generated-input test runs: `default` under `cargo test`, or
/// `EVMM_SOAK_SEEDS` for a longer soak run.
pub fn soak_seeds(default: u64) -> u64 {
    std::env::var("EVMM_SOAK_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
