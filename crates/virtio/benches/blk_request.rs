#![allow(missing_docs)] // criterion_group! defines an undocumented public function
//! Per-request cost of the virtio-blk request path, without a guest: available-ring
//! pop, [`process_chain`] (request parse, the engine's preadv/pwritev/fdatasync against
//! a file on tmpfs, status byte) and the used-ring push, on mock guest memory, with
//! each engine: `sync`, and `io_uring` one request at a time (submit, wait for the
//! completion, answer it). A counting allocator checks that serving a request
//! allocates nothing: the allocations per request of each case are printed after the
//! warm-up (`allocations per request: 0`), and a case that allocates fails the bench.
//!
//! Each benchmark serves one descriptor chain, written once at descriptor 0; every
//! available-ring slot points at it. The driver's side (publishing `n` more available
//! entries, one `u16` store of the available index) happens outside the timed region
//! every `QSIZE` requests, so each timed iteration is exactly what the worker does per
//! chain: `queue.iter(mem).next()`, `process_chain`, `queue.add_used`. Notification
//! suppression and interrupts (once per drain in the worker, not per request) are not
//! included. The disk is a 1 MiB file in /dev/shm (the temp dir if there is none); all
//! requests hit the same offset, so the file data stays in the page cache.
//!
//! Run with `cargo bench -p evmm-virtio`; criterion reports the time per request.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use evmm_virtio::blk::disk::DiskFile;
use evmm_virtio::blk::engine::{self, BlockEngine, EngineKind, Finished};
use evmm_virtio::blk::metrics::BlockQueueMetrics;
use evmm_virtio::blk::request::{RequestLimits, RequestScratch};
use evmm_virtio::blk::{complete_finished, config, process_chain, ChainOutcome};
use evmm_virtio::test_utils::{add_chain, guest_memory, used_idx, Desc, USED_ADDR};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::io::Write;
use std::num::Wrapping;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Counts allocations, to show that the request path makes none.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is
// added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Queue size (the device's own, [`config::QUEUE_SIZE`]).
const QSIZE: u16 = config::QUEUE_SIZE;
/// Request header, data buffers and status byte.
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
/// Disk size.
const DISK_BYTES: usize = 1 << 20;
const ID: &str = "evmm-bench-disk";

/// One request type, its data descriptors (address, length, device-writable), its
/// sector.
struct Case {
    name: &'static str,
    request_type: u32,
    sector: u64,
    data: Vec<Desc>,
}

impl Case {
    fn data_bytes(&self) -> u64 {
        self.data.iter().map(|d| u64::from(d.1)).sum()
    }
}

/// Everything one benchmark needs: guest memory with the chain in it, the device's
/// queue, a backend on the disk file.
struct Rig {
    mem: Arc<GuestMemoryMmap>,
    queue: Queue,
    engine: Box<dyn BlockEngine>,
    scratch: RequestScratch,
    finished: Vec<Finished>,
    metrics: BlockQueueMetrics,
    limits: RequestLimits,
    /// The driver's available index (what has been published so far).
    avail_idx: Wrapping<u16>,
    avail_idx_addr: GuestAddress,
    _disk: NamedTempFile,
}

fn disk_file() -> NamedTempFile {
    let dir = Path::new("/dev/shm");
    let mut f = if dir.is_dir() {
        tempfile::Builder::new()
            .prefix("evmm-blk-bench")
            .tempfile_in(dir)
    } else {
        tempfile::Builder::new().prefix("evmm-blk-bench").tempfile()
    }
    .expect("create the disk file");
    let bytes: Vec<u8> = (0..DISK_BYTES).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all(&bytes).expect("fill the disk file");
    f.flush().expect("flush the disk file");
    f
}

impl Rig {
    fn new(case: &Case, kind: EngineKind) -> Self {
        let mem = guest_memory();
        let disk = disk_file();
        let disk_file = DiskFile::open(disk.path(), false, false, ID).expect("open the disk");
        let limits = config::limits(disk_file.capacity_sectors());
        let mut engine = match kind {
            EngineKind::Sync => engine::open(kind, &Arc::new(disk_file), QSIZE),
            EngineKind::IoUring => Box::new(
                engine::UringEngine::new(Arc::new(disk_file), QSIZE)
                    .expect("this host gives no io_uring ring"),
            ),
        };
        // The Linux driver negotiates VIRTIO_BLK_F_FLUSH: writes are not synced one by one.
        engine.set_writeback(true);

        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&case.request_type.to_le_bytes());
        h[8..].copy_from_slice(&case.sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).expect("header");
        for (i, d) in case.data.iter().enumerate() {
            let fill = vec![0x40 + i as u8; d.1 as usize];
            mem.write_slice(&fill, GuestAddress(d.0)).expect("data");
        }

        let mut descs = vec![Desc(HDR, 16, false)];
        descs.extend_from_slice(&case.data);
        descs.push(Desc(STATUS, 1, true));

        let (queue, avail_idx_addr) = {
            let vq = MockSplitQueue::new(&mem, QSIZE);
            // Writes the chain at descriptor 0 and publishes it once (available slot 0,
            // available index 1). The other slots hold 0 too: they all name this chain.
            add_chain(&vq, 0, &descs);
            let mut q: Queue = vq.create_queue().expect("queue");
            q.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
            (q, GuestAddress(vq.avail_addr().0 + 2))
        };
        let avail_idx = Wrapping(mem.read_obj::<u16>(avail_idx_addr).expect("avail idx"));

        Self {
            mem: Arc::new(mem),
            queue,
            engine,
            scratch: RequestScratch::default(),
            finished: Vec::with_capacity(usize::from(QSIZE)),
            metrics: BlockQueueMetrics::default(),
            limits,
            avail_idx,
            avail_idx_addr,
            _disk: disk,
        }
    }

    /// The driver's side: makes `n` (at most `QSIZE` minus what is pending) more
    /// chains available.
    fn publish(&mut self, n: u16) {
        self.avail_idx += Wrapping(n);
        self.mem
            .write_obj(self.avail_idx.0, self.avail_idx_addr)
            .expect("avail idx");
    }

    /// The device's side for one chain: pop, process, push used (for a request the
    /// engine keeps in flight: start it, wait for it, answer it). Returns the outcome.
    #[inline]
    fn serve_one(&mut self) -> ChainOutcome {
        let chain = self
            .queue
            .iter(&*self.mem)
            .expect("available ring")
            .next()
            .expect("a chain is available");
        let head = chain.head_index();
        let outcome = process_chain(
            self.engine.as_mut(),
            &mut self.scratch,
            chain,
            &self.mem,
            &self.limits,
        );
        match outcome.used_len() {
            Some(used_len) => self
                .queue
                .add_used(&*self.mem, head, used_len)
                .expect("used ring"),
            None => {
                assert_eq!(outcome, ChainOutcome::InFlight, "NEEDS_RESET");
                self.engine.start().expect("io_uring submit");
                self.engine.wait_idle(&mut self.finished);
                let d =
                    complete_finished(&mut self.queue, &self.mem, &self.finished, &self.metrics);
                assert_eq!(d.added, 1, "the request did not complete");
                self.finished.clear();
            }
        }
        outcome
    }

    /// Serves the chain published by `new` and checks the answer.
    fn check(&mut self, case: &Case) {
        let outcome = self.serve_one();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).expect("status");
        if let ChainOutcome::Done { completion, .. } = outcome {
            assert_eq!(completion.status, status, "{}", case.name);
        } else {
            assert_eq!(outcome, ChainOutcome::InFlight, "{}", case.name);
        }
        assert_eq!(status, VIRTIO_BLK_S_OK as u8, "{}", case.name);
        assert_eq!(used_idx(&*self.mem), 1, "{}", case.name);
        if case.request_type == VIRTIO_BLK_T_GET_ID {
            let mut id = [0u8; 20];
            self.mem
                .read_slice(&mut id, GuestAddress(DATA))
                .expect("id");
            assert_eq!(&id[..ID.len()], ID.as_bytes());
        }
        if case.request_type == VIRTIO_BLK_T_IN {
            let mut first = [0u8; 2];
            self.mem
                .read_slice(&mut first, GuestAddress(DATA))
                .expect("data");
            assert_eq!(first, [1, 2], "{}: disk data not read", case.name);
        }
    }

    /// Allocations per request over `n` requests (after the warm-up of `check`).
    fn allocations_per_request(&mut self, n: u16) -> f64 {
        self.publish(n);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..n {
            black_box(self.serve_one());
        }
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / f64::from(n)
    }

    /// `iters` requests, `QSIZE` at a time; only the serving is timed.
    fn run(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let n = left.min(u64::from(QSIZE)) as u16;
            self.publish(n);
            let start = Instant::now();
            for _ in 0..n {
                black_box(self.serve_one());
            }
            total += start.elapsed();
            left -= u64::from(n);
        }
        total
    }
}

fn cases() -> Vec<Case> {
    const K4: u32 = 4 << 10;
    vec![
        Case {
            name: "get_id",
            request_type: VIRTIO_BLK_T_GET_ID,
            sector: 0,
            data: vec![Desc(DATA, 20, true)],
        },
        Case {
            name: "in_4k",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            data: vec![Desc(DATA, K4, true)],
        },
        Case {
            name: "out_4k",
            request_type: VIRTIO_BLK_T_OUT,
            sector: 1024,
            data: vec![Desc(DATA, K4, false)],
        },
        Case {
            name: "in_64k",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            data: vec![Desc(DATA, 64 << 10, true)],
        },
        // What a Linux guest sends for 64 KiB in scattered pages: 16 segments.
        Case {
            name: "in_64k_16seg",
            request_type: VIRTIO_BLK_T_IN,
            sector: 0,
            data: (0..16u64)
                .map(|i| Desc(DATA + i * 2 * u64::from(K4), K4, true))
                .collect(),
        },
        Case {
            name: "flush",
            request_type: VIRTIO_BLK_T_FLUSH,
            sector: 0,
            data: vec![],
        },
    ]
}

fn blk_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("blk_request");
    for (kind, case) in [EngineKind::Sync, EngineKind::IoUring]
        .into_iter()
        .flat_map(|k| cases().into_iter().map(move |c| (k, c)))
    {
        let mut rig = Rig::new(&case, kind);
        rig.check(&case);
        let allocations = rig.allocations_per_request(QSIZE - 1);
        eprintln!(
            "{kind} {}: allocations per request: {allocations}",
            case.name
        );
        assert_eq!(
            allocations, 0.0,
            "{kind} {}: the request path allocates",
            case.name
        );
        match case.request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                group.throughput(Throughput::Bytes(case.data_bytes()));
            }
            _ => {
                group.throughput(Throughput::Elements(1));
            }
        }
        group.bench_function(format!("{kind}/{}", case.name), |b| {
            b.iter_custom(|iters| rig.run(iters))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .without_plots()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = blk_request
}
criterion_main!(benches);
