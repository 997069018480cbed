//! Unit tests of virtio-blk: each request type on a temporary file, each malformed
//! chain of the guest-fault policy, read-only disks, EVENT_IDX suppression and the
//! worker thread end to end.

use super::config;
use super::disk::DiskFile;
use super::engine::{self as engines, EngineChoice, EngineKind};
use super::metrics::{BlockQueueMetrics, BlockQueueSnapshot};
use super::worker::{BlockWorker, WorkerQueue};
use super::*;
use crate::device::ActivateContext;
use crate::device::{ReadyQueue, VirtioDevice};
use crate::fault::FaultLog;
use crate::test_utils::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SECTORS: u64 = 64;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const OUTSIDE: u64 = MEM_SIZE as u64 + 0x1000;

fn pattern(off: usize) -> u8 {
    ((off * 7 + off / 512) % 251) as u8 + 1
}

fn disk_image() -> (NamedTempFile, Vec<u8>) {
    let mut f = NamedTempFile::new().unwrap();
    let bytes: Vec<u8> = (0..(SECTORS as usize * 512)).map(pattern).collect();
    f.write_all(&bytes).unwrap();
    f.flush().unwrap();
    (f, bytes)
}

fn file_bytes(f: &NamedTempFile) -> Vec<u8> {
    let mut v = Vec::new();
    let mut file = f.reopen().unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut v).unwrap();
    v
}

fn header(mem: &GuestMemoryMmap, addr: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

struct Harness {
    mem: GuestMemoryMmap,
    irq: Arc<RecordingInterrupt>,
    worker: BlockWorker,
}

impl Harness {
    fn new(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        disk: &NamedTempFile,
        readonly: bool,
        id: &str,
    ) -> Self {
        let disk = DiskFile::open(disk.path(), readonly, false, id).unwrap();
        Self::with_disk(mem, vq, disk)
    }

    fn with_disk(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        disk: DiskFile,
    ) -> Self {
        Self::with_engine(mem, vq, disk, EngineKind::Sync)
    }

    fn with_engine(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        disk: DiskFile,
        kind: EngineKind,
    ) -> Self {
        let disk = Arc::new(disk);
        let irq = Arc::new(RecordingInterrupt::new());
        let engine = match kind {
            EngineKind::Sync => engines::open(kind, &disk, QSIZE),
            // Not `open`: a host without io_uring must fail these tests, not fall back.
            EngineKind::IoUring => Box::new(
                engines::UringEngine::new(disk.clone(), QSIZE)
                    .unwrap_or_else(|e| panic!("this host gives no io_uring ring: {e}")),
            ),
        };
        let worker = BlockWorker {
            mem: Arc::new(mem.clone()),
            disk: disk.clone(),
            queues: vec![WorkerQueue {
                ready: ReadyQueue {
                    index: 0,
                    queue: make_queue(vq),
                    kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                },
                broken: false,
                engine,
                scratch: Default::default(),
                more: false,
            }],
            limits: config::limits(disk.capacity_sectors()),
            interrupt: irq.clone(),
            metrics: Arc::from(vec![BlockQueueMetrics::default()]),
            faults: Arc::new(FaultLog::new("virtio-blk")),
            poll: crate::poll::PollWindow::new(crate::poll::PollMode::Off),
            poll_metrics: Arc::default(),
            checks: 0,
            finished: Vec::new(),
        };
        Self {
            mem: mem.clone(),
            irq,
            worker,
        }
    }

    /// Serves the queue and waits for what the engine has in flight.
    fn run(&mut self) -> usize {
        self.worker.process_queue(0) + self.worker.settle(0)
    }

    fn m(&self) -> BlockQueueSnapshot {
        self.worker.metrics[0].snapshot()
    }

    fn broken(&self) -> bool {
        self.worker.queues[0].broken
    }
}

/// Header + data segments + status, as one chain at descriptor 0.
fn request(vq: &MockSplitQueue<GuestMemoryMmap>, data: &[Desc]) {
    let mut descs = vec![Desc(HDR, 16, false)];
    descs.extend_from_slice(data);
    descs.push(Desc(STATUS, 1, true));
    add_chain(vq, 0, &descs);
}

fn setup() -> (GuestMemoryMmap, NamedTempFile, Vec<u8>) {
    let (f, bytes) = disk_image();
    (guest_memory(), f, bytes)
}

/// Runs one request and expects `want` in its status byte and `used_len` in the used ring.
fn expect(h: &mut Harness, want: u32, used_len: u32) {
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(h.run(), 1);
    assert_eq!(status(&h.mem), want as u8);
    assert_eq!(used_idx(&h.mem), 1);
    assert_eq!(used_elem(&h.mem, 0), (0, used_len));
    assert!(!h.irq.needs_reset());
}

/// Runs one chain and expects NEEDS_RESET, no used entry and a stopped queue.
fn expect_needs_reset(h: &mut Harness) {
    assert_eq!(h.run(), 0);
    assert!(h.irq.needs_reset());
    assert_eq!(used_idx(&h.mem), 0);
    assert!(h.broken());
    assert_eq!(h.m().malformed_chains, 1);
}

#[test]
fn read_in_two_segments() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    request(
        &vq,
        &[Desc(DATA, 512, true), Desc(DATA + 0x1000, 1024, true)],
    );
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_OK, 1536 + 1);
    let mut a = vec![0u8; 512];
    let mut b = vec![0u8; 1024];
    mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut b, GuestAddress(DATA + 0x1000)).unwrap();
    assert_eq!(a, bytes[3 * 512..4 * 512]);
    assert_eq!(b, bytes[4 * 512..6 * 512]);
    let m = h.m();
    assert_eq!((m.req_in, m.bytes_read, m.interrupts), (1, 1536, 1));
    assert_eq!(h.irq.vring(), 1);
}

#[test]
fn write_out() {
    let (mem, f, mut bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 10);
    mem.write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .unwrap();
    request(&vq, &[Desc(DATA, 1024, false)]);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_OK, 1);
    bytes[10 * 512..12 * 512].fill(0xab);
    assert_eq!(file_bytes(&f), bytes);
    assert_eq!((h.m().req_out, h.m().bytes_written), (1, 1024));
}

#[test]
fn large_write_and_read_cross_the_bounce_buffer() {
    // 1.5 MiB in two segments: more than one bounce-buffer round.
    let mut f = NamedTempFile::new().unwrap();
    f.write_all(&vec![0u8; 4 << 20]).unwrap();
    let mem = guest_memory();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let data: Vec<u8> = (0..(3 << 19)).map(pattern).collect();
    mem.write_slice(&data, GuestAddress(0x40_0000)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 8);
    request(
        &vq,
        &[
            Desc(0x40_0000, 1 << 20, false),
            Desc(0x50_0000, 1 << 19, false),
        ],
    );
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_OK, 1);
    assert_eq!(file_bytes(&f)[8 * 512..8 * 512 + data.len()], data[..]);

    header(&mem, HDR + 0x100, VIRTIO_BLK_T_IN, 8);
    add_chain(
        &vq,
        4,
        &[
            Desc(HDR + 0x100, 16, false),
            Desc(0x80_0000, 1 << 19, true),
            Desc(0x90_0000, 1 << 20, true),
            Desc(STATUS, 1, true),
        ],
    );
    assert_eq!(h.run(), 1);
    assert_eq!(used_elem(&mem, 1), (4, (3 << 19) + 1));
    let mut back = vec![0u8; data.len()];
    mem.read_slice(&mut back[..1 << 19], GuestAddress(0x80_0000))
        .unwrap();
    mem.read_slice(&mut back[1 << 19..], GuestAddress(0x90_0000))
        .unwrap();
    assert_eq!(back, data);
}

#[test]
fn any_layout_header_data_and_status_share_or_split_descriptors() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    // OUT with its data in the header's descriptor: header at DATA - 16.
    let data: Vec<u8> = (0..1024).map(|i| (i % 253) as u8).collect();
    header(&mem, DATA - 16, VIRTIO_BLK_T_OUT, 3);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    add_chain(
        &vq,
        0,
        &[Desc(DATA - 16, 16 + 1024, false), Desc(STATUS, 1, true)],
    );
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_OK, 1);
    assert_eq!(file_bytes(&f)[3 * 512..3 * 512 + 1024], data[..]);

    // IN with the status byte at the end of the data's descriptor, and the header split
    // in two descriptors.
    let mut h2 = [0u8; 16];
    h2[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h2[8..].copy_from_slice(&20u64.to_le_bytes());
    mem.write_slice(&h2[..8], GuestAddress(HDR)).unwrap();
    mem.write_slice(&h2[8..], GuestAddress(HDR + 0x800))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(DATA + 0x1_0000 + 512))
        .unwrap();
    add_chain(
        &vq,
        2,
        &[
            Desc(HDR, 8, false),
            Desc(HDR + 0x800, 8, false),
            Desc(DATA + 0x1_0000, 513, true),
        ],
    );
    assert_eq!(h.run(), 1);
    assert_eq!(used_elem(&mem, 1), (2, 513));
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x1_0000))
        .unwrap();
    assert_eq!(back, bytes[20 * 512..21 * 512]);
    let st: u8 = mem.read_obj(GuestAddress(DATA + 0x1_0000 + 512)).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn flush() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    request(&vq, &[]);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_OK, 1);
    assert_eq!(h.m().req_flush, 1);
}

/// A FLUSH on a fresh used ring of `vq`: its status byte.
fn flush_status(h: &mut Harness, vq: &MockSplitQueue<GuestMemoryMmap>, n: u16) -> u8 {
    header(&h.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(vq, 2 * n, &[Desc(HDR, 16, false), Desc(STATUS, 1, true)]);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(h.run(), 1);
    status(&h.mem)
}

#[test]
fn once_a_flush_failed_every_later_flush_fails() {
    for kind in [EngineKind::Sync, EngineKind::IoUring] {
        let (mem, f, _) = setup();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let disk = DiskFile::open(f.path(), false, false, "").unwrap();
        let mut h = Harness::with_engine(&mem, &vq, disk, kind);
        assert_eq!(
            flush_status(&mut h, &vq, 0),
            VIRTIO_BLK_S_OK as u8,
            "{kind}"
        );
        // An fdatasync failed (EIO from the storage): the kernel may have dropped the
        // dirty pages, so the next fdatasync would succeed with the data gone.
        h.worker.disk.note_flush_failed();
        for n in 1..4 {
            assert_eq!(
                flush_status(&mut h, &vq, n),
                VIRTIO_BLK_S_IOERR as u8,
                "{kind}: FLUSH {n} after the failure"
            );
        }
        assert!(h.worker.disk.sync_data().is_err());
    }
}

#[test]
fn a_flush_the_kernel_refuses_is_an_ioerr_and_is_remembered() {
    // fdatasync of a character device fails (EINVAL): a real failing flush.
    for kind in [EngineKind::Sync, EngineKind::IoUring] {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        let disk = DiskFile::on_file(null);
        let mut h = Harness::with_engine(&mem, &vq, disk, kind);
        assert_eq!(
            flush_status(&mut h, &vq, 0),
            VIRTIO_BLK_S_IOERR as u8,
            "{kind}"
        );
        assert!(h.worker.disk.flush_failed(), "{kind}");
    }
}

#[test]
fn get_id_is_zero_padded() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xeeu8; 20], GuestAddress(DATA)).unwrap();
    request(&vq, &[Desc(DATA, 20, true)]);
    let mut h = Harness::new(&mem, &vq, &f, false, "serial-42");
    expect(&mut h, VIRTIO_BLK_S_OK, 21);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    let mut want = [0u8; 20];
    want[..9].copy_from_slice(b"serial-42");
    assert_eq!(id, want);
    assert_eq!(h.m().req_get_id, 1);
}

#[test]
fn id_longer_than_20_bytes_is_refused() {
    let (f, _) = disk_image();
    let cfg = BlockConfig {
        path: f.path().into(),
        readonly: false,
        id: Some("x".repeat(21)),
        queues: 1,
        direct: false,
        poll: Default::default(),
        engine: EngineChoice::Only(EngineKind::Sync),
    };
    assert!(matches!(Block::new(cfg), Err(BlockError::Config(_))));
}

fn range(mem: &GuestMemoryMmap, addr: u64, sector: u64, n: u32, flags: u32) {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&n.to_le_bytes());
    r[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&r, GuestAddress(addr)).unwrap();
}

#[test]
fn discard_punches_a_hole() {
    let (mem, f, mut bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    range(&mem, DATA, 8, 16, 0);
    request(&vq, &[Desc(DATA, 16, false)]);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_OK, 1);
    bytes[8 * 512..24 * 512].fill(0);
    assert_eq!(file_bytes(&f), bytes);
    assert_eq!(h.m().req_discard, 1);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
        let (mem, f, mut bytes) = setup();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range(&mem, DATA, 1, 3, flags);
        request(&vq, &[Desc(DATA, 16, false)]);
        let mut h = Harness::new(&mem, &vq, &f, false, "");
        expect(&mut h, VIRTIO_BLK_S_OK, 1);
        bytes[512..4 * 512].fill(0);
        assert_eq!(file_bytes(&f), bytes);
        assert_eq!(h.m().req_write_zeroes, 1);
    }
}

#[test]
fn discard_with_flags_is_unsupported() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    range(&mem, DATA, 1, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    request(&vq, &[Desc(DATA, 16, false)]);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_UNSUPP, 1);
    assert_eq!(file_bytes(&f), bytes);
}

#[test]
fn discard_range_beyond_capacity_or_too_many_ranges() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    range(&mem, DATA, SECTORS - 1, 2, 0);
    request(&vq, &[Desc(DATA, 16, false)]);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_IOERR, 1);

    range(&mem, DATA + 16, 0, 1, 0);
    add_chain(
        &vq,
        4,
        &[
            Desc(HDR, 16, false),
            Desc(DATA, 32, false),
            Desc(STATUS, 1, true),
        ],
    );
    h.run();
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(file_bytes(&f), bytes);
    assert_eq!(h.m().malformed_chains, 2);
}

#[test]
fn unknown_type_is_unsupported() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, 99, 0);
    request(&vq, &[]);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_UNSUPP, 1);
    assert_eq!((h.m().req_unsupported, h.m().malformed_chains), (1, 0));
}

#[test]
fn readonly_disk_refuses_writes_and_serves_reads() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let mut h = Harness::new(&mem, &vq, &f, true, "");
    let mut first = 0u16;
    for (i, t) in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ]
    .into_iter()
    .enumerate()
    {
        let hdr = HDR + 0x100 * i as u64;
        header(&mem, hdr, t, 0);
        range(&mem, DATA, 0, 4, 0);
        add_chain(
            &vq,
            first,
            &[
                Desc(hdr, 16, false),
                Desc(DATA, 512, false),
                Desc(STATUS + i as u64, 1, true),
            ],
        );
        first += 3;
    }
    // DISCARD/WRITE_ZEROES with 512 bytes of ranges is malformed anyway; use 16.
    vq.desc_table()
        .store(4, raw_desc(DATA, 16, VRING_DESC_F_NEXT, 5))
        .unwrap();
    vq.desc_table()
        .store(7, raw_desc(DATA, 16, VRING_DESC_F_NEXT, 8))
        .unwrap();
    assert_eq!(h.run(), 3);
    for i in 0..3 {
        let s: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(s, VIRTIO_BLK_S_IOERR as u8, "request {i}");
    }
    assert_eq!(file_bytes(&f), bytes);

    header(&mem, HDR + 0x400, VIRTIO_BLK_T_IN, 0);
    add_chain(
        &vq,
        9,
        &[
            Desc(HDR + 0x400, 16, false),
            Desc(DATA, 512, true),
            Desc(STATUS, 1, true),
        ],
    );
    assert_eq!(h.run(), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, bytes[..512]);
}

#[test]
fn readonly_device_offers_ro_and_opens_rdonly() {
    let (f, _) = disk_image();
    let mut perms = std::fs::metadata(f.path()).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(f.path(), perms).unwrap();
    let cfg = BlockConfig {
        path: f.path().into(),
        readonly: true,
        id: None,
        queues: 1,
        direct: false,
        poll: Default::default(),
        engine: EngineChoice::Only(EngineKind::Sync),
    };
    let b = Block::new(cfg).unwrap();
    assert_ne!(b.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(b.avail_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn features_and_config_space() {
    let (f, _) = disk_image();
    let cfg = BlockConfig {
        path: f.path().into(),
        readonly: false,
        id: None,
        queues: 4,
        direct: false,
        poll: Default::default(),
        engine: EngineChoice::Only(EngineKind::Sync),
    };
    let b = Block::new(cfg).unwrap();
    let feats = b.avail_features();
    for bit in [
        32,
        28,
        29,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ] {
        assert_ne!(feats & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(feats & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(b.queue_max_sizes(), &[256u16; 4]);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut w = [0u8; 4];
    b.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), config::SEG_MAX);
    b.read_config(20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 512);
    let mut nq = [0u8; 2];
    b.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 4);
    // Past the end reads zeros, never panics.
    let mut far = [0xffu8; 8];
    b.read_config(u64::MAX - 2, &mut far);
    assert_eq!(far, [0; 8]);
    b.read_config(56, &mut far);
    assert_eq!(far, [1, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn bad_queue_count_is_refused() {
    let (f, _) = disk_image();
    let cfg = BlockConfig {
        path: f.path().into(),
        readonly: false,
        id: None,
        queues: 0,
        direct: false,
        poll: Default::default(),
        engine: EngineChoice::Only(EngineKind::Sync),
    };
    assert!(matches!(Block::new(cfg), Err(BlockError::Config(_))));
}

#[test]
fn indirect_descriptors_are_followed() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    let table = 0x50_0000u64;
    let entries = [
        raw_desc(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw_desc(DATA, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        raw_desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    for (i, d) in entries.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    vq.add_desc_chains(&[raw_desc(table, 48, VRING_DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_OK, 513);
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, bytes[1024..1536]);
}

// ---- the guest-fault policy: answered in the status byte ----

fn rejected(data: &[Desc], t: u32, sector: u64, want: u32) -> Harness {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, t, sector);
    request(&vq, data);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, want, 1);
    assert_eq!(file_bytes(&f), bytes);
    assert!(!h.broken());
    h
}

#[test]
fn data_descriptor_outside_guest_memory() {
    let h = rejected(
        &[Desc(OUTSIDE, 512, true)],
        VIRTIO_BLK_T_IN,
        0,
        VIRTIO_BLK_S_IOERR,
    );
    assert_eq!(h.m().malformed_chains, 1);
    rejected(
        &[Desc(OUTSIDE, 512, false)],
        VIRTIO_BLK_T_OUT,
        0,
        VIRTIO_BLK_S_IOERR,
    );
    // Straddling the end of memory.
    rejected(
        &[Desc(MEM_SIZE as u64 - 256, 512, true)],
        VIRTIO_BLK_T_IN,
        0,
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn header_outside_guest_memory() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    add_chain(&vq, 0, &[Desc(OUTSIDE, 16, false), Desc(STATUS, 1, true)]);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_IOERR, 1);
}

#[test]
fn header_in_a_write_only_descriptor() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    add_chain(
        &vq,
        0,
        &[
            Desc(HDR, 16, true),
            Desc(DATA, 512, true),
            Desc(STATUS, 1, true),
        ],
    );
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_IOERR, 1);
}

#[test]
fn header_too_short_or_missing() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(&vq, 0, &[Desc(HDR, 8, false), Desc(STATUS, 1, true)]);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_IOERR, 1);

    add_chain(&vq, 2, &[Desc(STATUS, 1, true)]);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(h.run(), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.m().malformed_chains, 2);
}

#[test]
fn more_than_seg_max_segments() {
    // An indirect table with header + SEG_MAX + 1 data segments + status.
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let n = config::SEG_MAX as usize + 1;
    let table = 0x50_0000u64;
    let mut entries = vec![raw_desc(HDR, 16, VRING_DESC_F_NEXT, 1)];
    for i in 0..n {
        entries.push(raw_desc(
            DATA + 512 * i as u64,
            512,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            i as u16 + 2,
        ));
    }
    entries.push(raw_desc(STATUS, 1, VRING_DESC_F_WRITE, 0));
    for (i, d) in entries.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let len = 16 * entries.len() as u32;
    vq.add_desc_chains(&[raw_desc(table, len, VRING_DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect(&mut h, VIRTIO_BLK_S_IOERR, 1);
    assert_eq!(h.m().malformed_chains, 1);
}

#[test]
fn sector_beyond_capacity() {
    rejected(
        &[Desc(DATA, 512, true)],
        VIRTIO_BLK_T_IN,
        SECTORS,
        VIRTIO_BLK_S_IOERR,
    );
    rejected(
        &[Desc(DATA, 1024, false)],
        VIRTIO_BLK_T_OUT,
        SECTORS - 1,
        VIRTIO_BLK_S_IOERR,
    );
    rejected(
        &[Desc(DATA, 512, true)],
        VIRTIO_BLK_T_IN,
        u64::MAX,
        VIRTIO_BLK_S_IOERR,
    );
    rejected(
        &[Desc(DATA, 512, true)],
        VIRTIO_BLK_T_IN,
        u64::MAX >> 9,
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn segment_or_request_larger_than_allowed() {
    let big = config::SIZE_MAX + 512;
    rejected(
        &[Desc(DATA, big, true)],
        VIRTIO_BLK_T_IN,
        0,
        VIRTIO_BLK_S_IOERR,
    );

    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    request(
        &vq,
        &[Desc(DATA, 4096, true), Desc(DATA + 4096, 4096, true)],
    );
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    h.worker.limits.max_request_bytes = 4096;
    expect(&mut h, VIRTIO_BLK_S_IOERR, 1);
}

#[test]
fn data_in_the_wrong_direction() {
    rejected(
        &[Desc(DATA, 512, false)],
        VIRTIO_BLK_T_IN,
        0,
        VIRTIO_BLK_S_IOERR,
    );
    rejected(
        &[Desc(DATA, 512, true)],
        VIRTIO_BLK_T_OUT,
        0,
        VIRTIO_BLK_S_IOERR,
    );
    rejected(
        &[Desc(DATA, 20, false)],
        VIRTIO_BLK_T_GET_ID,
        0,
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn data_not_a_multiple_of_the_sector_size() {
    rejected(
        &[Desc(DATA, 100, false)],
        VIRTIO_BLK_T_OUT,
        0,
        VIRTIO_BLK_S_IOERR,
    );
}

// ---- the guest-fault policy: no status byte, NEEDS_RESET ----

fn needs_reset_case(descs: &[Desc]) {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    add_chain(&vq, 0, descs);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect_needs_reset(&mut h);
    // The queue stays stopped: a good request behind it is not processed.
    header(&mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(
        &vq,
        8,
        &[Desc(HDR + 0x100, 16, false), Desc(STATUS, 1, true)],
    );
    assert_eq!(h.run(), 0);
    assert_eq!(file_bytes(&f), bytes);
}

#[test]
fn status_descriptor_not_writable() {
    needs_reset_case(&[
        Desc(HDR, 16, false),
        Desc(DATA, 512, false),
        Desc(STATUS, 1, false),
    ]);
}

#[test]
fn status_descriptor_empty() {
    needs_reset_case(&[
        Desc(HDR, 16, false),
        Desc(DATA, 512, false),
        Desc(STATUS, 0, true),
    ]);
}

#[test]
fn status_descriptor_outside_guest_memory() {
    needs_reset_case(&[
        Desc(HDR, 16, false),
        Desc(DATA, 512, false),
        Desc(OUTSIDE, 1, true),
    ]);
}

#[test]
fn status_descriptor_missing() {
    // Only a header: the last descriptor is device-readable.
    needs_reset_case(&[Desc(HDR, 16, false)]);
}

#[test]
fn descriptor_loop() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    vq.add_desc_chains(
        &[
            raw_desc(HDR, 16, VRING_DESC_F_NEXT, 1),
            raw_desc(DATA, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
        ],
        0,
    )
    .unwrap();
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect_needs_reset(&mut h);
}

#[test]
fn next_index_beyond_the_table() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    vq.add_desc_chains(&[raw_desc(HDR, 16, VRING_DESC_F_NEXT, 200)], 0)
        .unwrap();
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect_needs_reset(&mut h);
}

#[test]
fn head_index_beyond_the_queue() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    add_chain(&vq, 0, &[Desc(HDR, 16, false), Desc(STATUS, 1, true)]);
    // Rewrite avail ring entry 0 to point past the table.
    mem.write_obj(500u16, GuestAddress(vq.avail_addr().0 + 4))
        .unwrap();
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect_needs_reset(&mut h);
}

#[test]
fn available_index_too_far_ahead() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    mem.write_obj(QSIZE + 5, GuestAddress(vq.avail_addr().0 + 2))
        .unwrap();
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    assert_eq!(h.run(), 0);
    assert!(h.irq.needs_reset());
    assert!(h.broken());
}

#[test]
fn bad_indirect_table() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    // Length not a multiple of 16.
    vq.add_desc_chains(&[raw_desc(0x50_0000, 40, VRING_DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    expect_needs_reset(&mut h);
}

// ---- EVENT_IDX ----

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    h.worker.queues[0].ready.queue.set_event_idx(true);

    // The driver wants an interrupt only after used idx passes 3.
    set_used_event(&vq, &mem, 3);
    add_chain(&vq, 0, &[Desc(HDR, 16, false), Desc(STATUS, 1, true)]);
    assert_eq!(h.run(), 1);
    assert_eq!(h.irq.vring(), 0);
    assert_eq!(h.m().interrupts_suppressed, 1);
    // Re-enabled notifications: avail_event tells the driver to kick at the next entry.
    assert_eq!(avail_event(&mem), 1);

    // Two more chains in one go: used idx goes 1 -> 3, still not past used_event 3.
    add_chain(&vq, 2, &[Desc(HDR, 16, false), Desc(STATUS, 1, true)]);
    add_chain(&vq, 4, &[Desc(HDR, 16, false), Desc(STATUS, 1, true)]);
    assert_eq!(h.run(), 2);
    assert_eq!(h.irq.vring(), 0);
    assert_eq!(avail_event(&mem), 3);

    // used idx 3 -> 4 crosses used_event 3: interrupt.
    add_chain(&vq, 6, &[Desc(HDR, 16, false), Desc(STATUS, 1, true)]);
    assert_eq!(h.run(), 1);
    assert_eq!(h.irq.vring(), 1);
    let m = h.m();
    assert_eq!(
        (m.interrupts, m.interrupts_suppressed, m.req_flush),
        (1, 2, 4)
    );
    assert_eq!(used_idx(&mem), 4);
}

#[test]
fn without_event_idx_the_no_interrupt_flag_is_honoured() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    // VRING_AVAIL_F_NO_INTERRUPT in the available ring's flags: a polling driver.
    mem.write_obj(1u16, GuestAddress(vq.avail_addr().0))
        .unwrap();
    add_chain(&vq, 0, &[Desc(HDR, 16, false), Desc(STATUS, 1, true)]);
    assert_eq!(h.run(), 1);
    assert_eq!(h.irq.vring(), 0);
    assert_eq!((h.m().interrupts, h.m().interrupts_suppressed), (0, 1));
    // The driver clears the flag: the next completion interrupts.
    mem.write_obj(0u16, GuestAddress(vq.avail_addr().0))
        .unwrap();
    add_chain(&vq, 2, &[Desc(HDR, 16, false), Desc(STATUS, 1, true)]);
    assert_eq!(h.run(), 1);
    assert_eq!(h.irq.vring(), 1);
}

#[test]
fn without_event_idx_every_batch_interrupts() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let mut h = Harness::new(&mem, &vq, &f, false, "");
    set_used_event(&vq, &mem, 100);
    add_chain(&vq, 0, &[Desc(HDR, 16, false), Desc(STATUS, 1, true)]);
    assert_eq!(h.run(), 1);
    assert_eq!(h.irq.vring(), 1);
    // Nothing new: no interrupt.
    assert_eq!(h.run(), 0);
    assert_eq!(h.irq.vring(), 1);
}

// ---- the worker thread end to end ----

#[test]
fn worker_end_to_end() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let cfg = BlockConfig {
        path: f.path().into(),
        readonly: false,
        id: None,
        queues: 1,
        direct: false,
        // Kicks are counted below: the worker sleeps on them.
        poll: crate::poll::PollMode::Off,
        engine: EngineChoice::Only(EngineKind::Sync),
    };
    let mut blk = Block::new(cfg).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 5);
    request(&vq, &[Desc(DATA, 512, true)]);

    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(RecordingInterrupt::new());
    // Three kicks before the worker looks: they coalesce into one wake-up.
    kick.write(1).unwrap();
    kick.write(1).unwrap();
    kick.write(1).unwrap();
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: blk.avail_features(),
        queues: vec![make_queue(&vq)],
        kicks: vec![kick.try_clone().unwrap()],
        interrupt: irq.clone(),
    };
    blk.activate(ctx).unwrap();
    assert!(blk.is_active());
    assert!(wait_readable(&irq.fd));
    assert_eq!(irq.fd.read().unwrap(), 1);
    assert_eq!(used_idx(&mem), 1);
    assert_eq!(used_elem(&mem, 0), (0, 513));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, bytes[5 * 512..6 * 512]);

    // A second kick with a second request.
    header(&mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(
        &vq,
        4,
        &[Desc(HDR + 0x100, 16, false), Desc(STATUS, 1, true)],
    );
    set_used_event(&vq, &mem, 1);
    kick.write(1).unwrap();
    assert!(wait_readable(&irq.fd));
    assert_eq!(used_idx(&mem), 2);

    let m = blk.metrics_snapshot().queues[0];
    assert_eq!(m.kicks, 4);
    assert_eq!(m.wakeups, 2);
    assert!(m.kicks >= m.wakeups);
    assert_eq!((m.req_in, m.req_flush, m.bytes_read), (1, 1, 512));
    assert_eq!(m.interrupts + m.interrupts_suppressed, 2);
    assert_eq!(m.interrupts, irq.vring());
    let json = blk.metrics();
    assert_eq!(json["queues"][0]["kicks"], 4);
    assert_eq!(json["engine"], "sync");

    // Reset stops the thread; the device can be activated again.
    blk.reset();
    assert!(!blk.is_active());
    let vq2 = MockSplitQueue::create(&mem, GuestAddress(0x60_0000), QSIZE);
    let mut q2: virtio_queue::Queue = vq2.create_queue().unwrap();
    q2.set_used_ring_address(Some(0x70_0000), Some(0));
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: 1 << 32,
        queues: vec![q2],
        kicks: vec![kick.try_clone().unwrap()],
        interrupt: irq.clone(),
    };
    blk.activate(ctx).unwrap();
    assert!(blk.is_active());
    drop(blk); // Drop joins the worker.
}

#[test]
fn activate_refuses_a_wrong_queue_count() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let cfg = BlockConfig {
        path: f.path().into(),
        readonly: false,
        id: None,
        queues: 2,
        direct: false,
        poll: Default::default(),
        engine: EngineChoice::Only(EngineKind::Sync),
    };
    let mut blk = Block::new(cfg).unwrap();
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: 1 << 32,
        queues: vec![make_queue(&vq)],
        kicks: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
        interrupt: Arc::new(RecordingInterrupt::new()),
    };
    assert!(matches!(
        blk.activate(ctx),
        Err(crate::device::ActivateError::BadSetup(_))
    ));
    assert!(!blk.is_active());
}

#[test]
fn direct_io_uses_aligned_bounce_buffers() {
    // O_DIRECT needs a file system that supports it (tmpfs does not): skip there.
    let (mem, f, mut bytes) = setup();
    let disk = match DiskFile::open(f.path(), false, true, "") {
        Ok(d) => d,
        Err(BlockError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("O_DIRECT unsupported here; skipped");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let vq = MockSplitQueue::new(&mem, QSIZE);
    // Guest buffers at odd (512-aligned only) addresses, split unevenly.
    mem.write_slice(&[0x5au8; 1536], GuestAddress(DATA + 512))
        .unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 7);
    request(
        &vq,
        &[Desc(DATA + 512, 1000, false), Desc(DATA + 1512, 536, false)],
    );
    let mut h = Harness::with_disk(&mem, &vq, disk);
    expect(&mut h, VIRTIO_BLK_S_OK, 1);
    bytes[7 * 512..10 * 512].fill(0x5a);
    assert_eq!(file_bytes(&f), bytes);

    header(&mem, HDR + 0x100, VIRTIO_BLK_T_IN, 6);
    add_chain(
        &vq,
        4,
        &[
            Desc(HDR + 0x100, 16, false),
            Desc(DATA + 0x10_0001, 1024, true),
            Desc(STATUS, 1, true),
        ],
    );
    assert_eq!(h.run(), 1);
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x10_0001))
        .unwrap();
    assert_eq!(back, bytes[6 * 512..8 * 512]);
}

// ---- the engines: both run every data-moving request the same way ----

const ENGINES: [EngineKind; 2] = [EngineKind::Sync, EngineKind::IoUring];

/// A small deterministic generator for the seeded workloads.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn each_engine_writes_flushes_and_reads_back() {
    for kind in ENGINES {
        let (mem, f, mut bytes) = setup();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let disk = DiskFile::open(f.path(), false, false, "").unwrap();
        let mut h = Harness::with_engine(&mem, &vq, disk, kind);
        // OUT of 1536 bytes in two segments, at sector 9.
        mem.write_slice(&[0x3cu8; 1024], GuestAddress(DATA))
            .unwrap();
        mem.write_slice(&[0x3cu8; 512], GuestAddress(DATA + 0x1000))
            .unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 9);
        request(
            &vq,
            &[Desc(DATA, 1024, false), Desc(DATA + 0x1000, 512, false)],
        );
        expect(&mut h, VIRTIO_BLK_S_OK, 1);
        bytes[9 * 512..12 * 512].fill(0x3c);
        assert!(file_bytes(&f) == bytes, "{kind}: the file differs");
        // FLUSH.
        header(&mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
        add_chain(
            &vq,
            4,
            &[Desc(HDR + 0x100, 16, false), Desc(STATUS, 1, true)],
        );
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(h.run(), 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8, "{kind}");
        // IN of the same range and one sector around it.
        header(&mem, HDR + 0x200, VIRTIO_BLK_T_IN, 8);
        add_chain(
            &vq,
            8,
            &[
                Desc(HDR + 0x200, 16, false),
                Desc(DATA + 0x8000, 2560, true),
                Desc(STATUS, 1, true),
            ],
        );
        assert_eq!(h.run(), 1);
        assert_eq!(used_elem(&mem, 2), (8, 2561), "{kind}");
        let mut back = vec![0u8; 2560];
        mem.read_slice(&mut back, GuestAddress(DATA + 0x8000))
            .unwrap();
        assert_eq!(back, bytes[8 * 512..13 * 512], "{kind}");
        let m = h.m();
        assert_eq!(
            (
                m.req_out,
                m.req_flush,
                m.req_in,
                m.bytes_read,
                m.bytes_written
            ),
            (1, 1, 1, 2560, 1536),
            "{kind}"
        );
        assert_eq!(h.irq.vring(), 3, "{kind}");
    }
}

#[test]
fn io_uring_keeps_a_whole_drain_in_flight_and_answers_each() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let disk = DiskFile::open(f.path(), false, false, "").unwrap();
    let mut h = Harness::with_engine(&mem, &vq, disk, EngineKind::IoUring);
    // Five reads of one sector each, posted together.
    for i in 0..5u64 {
        header(&mem, HDR + 0x100 * i, VIRTIO_BLK_T_IN, 10 + i);
        add_chain(
            &vq,
            (3 * i) as u16,
            &[
                Desc(HDR + 0x100 * i, 16, false),
                Desc(DATA + 0x1000 * i, 512, true),
                Desc(STATUS + i, 1, true),
            ],
        );
    }
    // The drain only submits: nothing is answered until the completions are reaped.
    assert_eq!(h.worker.process_queue(0), 0);
    assert_eq!(h.worker.queues[0].engine.in_flight(), 5);
    assert_eq!(used_idx(&mem), 0);
    assert_eq!(h.worker.settle(0), 5);
    assert_eq!(used_idx(&mem), 5);
    let mut heads: Vec<u32> = (0..5).map(|i| used_elem(&mem, i).0).collect();
    heads.sort_unstable();
    assert_eq!(heads, vec![0, 3, 6, 9, 12]);
    for i in 0..5u64 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        let mut back = vec![0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA + 0x1000 * i))
            .unwrap();
        let s = (10 + i) as usize * 512;
        assert_eq!(back, bytes[s..s + 512]);
    }
    // One interrupt for the batch (EVENT_IDX off: the driver wants every batch).
    assert_eq!(h.irq.vring(), 1);
    assert_eq!(h.m().req_in, 5);
}

#[test]
fn io_uring_refuses_a_head_posted_again_while_in_flight() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let disk = DiskFile::open(f.path(), false, false, "").unwrap();
    let mut h = Harness::with_engine(&mem, &vq, disk, EngineKind::IoUring);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    request(&vq, &[Desc(DATA, 512, true)]);
    assert_eq!(h.worker.process_queue(0), 0);
    // The same chain made available again before the device answered it.
    request(&vq, &[Desc(DATA, 512, true)]);
    assert_eq!(
        h.worker.process_queue(0),
        1,
        "the duplicate is answered at once"
    );
    assert_eq!(used_elem(&mem, 0), (0, 1));
    assert_eq!(h.worker.settle(0), 1);
    assert_eq!(used_idx(&mem), 2);
    assert!(!h.broken());
}

#[test]
fn io_uring_refuses_writes_to_a_read_only_disk() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let disk = DiskFile::open(f.path(), true, false, "").unwrap();
    let mut h = Harness::with_engine(&mem, &vq, disk, EngineKind::IoUring);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    request(&vq, &[Desc(DATA, 512, false)]);
    expect(&mut h, VIRTIO_BLK_S_IOERR, 1);
    assert_eq!(file_bytes(&f), bytes);
}

/// A seeded workload of reads, writes (one or two segments), flushes and
/// write-zeroes, several requests in flight at a time on disjoint sectors, checked
/// against a model of the disk: every read returns what the model holds, and the file
/// ends as the model.
fn seeded_workload(kind: EngineKind, seed: u64) {
    let (mem, f, mut model) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let disk = DiskFile::open(f.path(), false, false, "").unwrap();
    let mut h = Harness::with_engine(&mem, &vq, disk, kind);
    // The mock's own available ring does not wrap; this one does.
    let mut ring = DriverRing::of_mock(&vq);
    let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut answered = 0u16;
    for batch in 0..40u64 {
        // Up to 4 requests of up to 4 descriptors: the 16-entry table, once per batch.
        let n = 1 + rng.below(4) as usize;
        let mut chunks: Vec<u64> = (0..8).collect();
        let mut expected_reads = Vec::new();
        for r in 0..n {
            let chunk = chunks.remove(rng.below(chunks.len() as u64) as usize);
            let sector = chunk * 8 + rng.below(4);
            let sectors = 1 + rng.below(4);
            let len = (sectors * 512) as u32;
            let hdr = HDR + 0x100 * r as u64;
            // Away from the headers and status bytes: 0x40_0000 and up.
            let data = 0x40_0000 + 0x4_0000 * r as u64 + 512 * rng.below(8);
            let st = STATUS + r as u64;
            let split = (rng.below(2) == 1 && sectors > 1).then_some(512u32);
            let mut descs = vec![Desc(hdr, 16, false)];
            let kind_of = rng.below(10);
            let t = match kind_of {
                0..=3 => VIRTIO_BLK_T_IN,
                4..=7 => VIRTIO_BLK_T_OUT,
                8 => VIRTIO_BLK_T_FLUSH,
                _ => VIRTIO_BLK_T_WRITE_ZEROES,
            };
            header(&mem, hdr, t, sector);
            let range = sector as usize * 512..(sector as usize * 512 + len as usize);
            match t {
                VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                    let writable = t == VIRTIO_BLK_T_IN;
                    match split {
                        Some(a) => {
                            descs.push(Desc(data, a, writable));
                            descs.push(Desc(data + 0x8000, len - a, writable));
                        }
                        None => descs.push(Desc(data, len, writable)),
                    }
                    if writable {
                        expected_reads.push((descs.clone(), model[range].to_vec()));
                    } else {
                        let fill: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                        let mut off = 0usize;
                        for d in &descs[1..] {
                            let part = &fill[off..off + d.1 as usize];
                            mem.write_slice(part, GuestAddress(d.0)).unwrap();
                            off += d.1 as usize;
                        }
                        model[range].copy_from_slice(&fill);
                    }
                }
                VIRTIO_BLK_T_WRITE_ZEROES => {
                    range_at(&mem, data, sector, sectors as u32, 0);
                    descs.push(Desc(data, 16, false));
                    model[range].fill(0);
                }
                _ => {}
            }
            descs.push(Desc(st, 1, true));
            mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
            ring.add_chain(&mem, &descs);
        }
        let added = h.run();
        assert_eq!(added, n, "{kind} seed {seed} batch {batch}");
        for r in 0..n {
            let st: u8 = mem.read_obj(GuestAddress(STATUS + r as u64)).unwrap();
            assert_eq!(
                st, VIRTIO_BLK_S_OK as u8,
                "{kind} seed {seed} batch {batch}"
            );
        }
        for (descs, want) in expected_reads {
            let mut got = Vec::new();
            for d in &descs[1..] {
                let mut part = vec![0u8; d.1 as usize];
                mem.read_slice(&mut part, GuestAddress(d.0)).unwrap();
                got.extend(part);
            }
            assert!(
                got == want,
                "{kind} seed {seed} batch {batch}: a read differs"
            );
        }
        answered = answered.wrapping_add(n as u16);
        assert_eq!(used_idx(&mem), answered);
    }
    assert!(
        file_bytes(&f) == model,
        "{kind} seed {seed}: the file differs"
    );
    assert!(!h.broken() && !h.irq.needs_reset());
}

fn range_at(mem: &GuestMemoryMmap, addr: u64, sector: u64, n: u32, flags: u32) {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&n.to_le_bytes());
    r[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&r, GuestAddress(addr)).unwrap();
}

#[test]
fn seeded_workloads_keep_the_data_intact_on_every_engine() {
    for kind in ENGINES {
        for seed in 1..=12 {
            seeded_workload(kind, seed);
        }
    }
}

#[test]
fn the_worker_serves_io_uring_completions_end_to_end() {
    let (mem, f, bytes) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let mut blk = Block::new(BlockConfig {
        path: f.path().into(),
        readonly: false,
        id: None,
        queues: 1,
        direct: false,
        poll: Default::default(),
        engine: EngineChoice::Only(EngineKind::IoUring),
    })
    .unwrap();
    assert_eq!(blk.engine(), EngineKind::IoUring);
    for i in 0..3u64 {
        header(&mem, HDR + 0x100 * i, VIRTIO_BLK_T_IN, 20 + i);
        add_chain(
            &vq,
            (3 * i) as u16,
            &[
                Desc(HDR + 0x100 * i, 16, false),
                Desc(DATA + 0x1000 * i, 512, true),
                Desc(STATUS + i, 1, true),
            ],
        );
    }
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(RecordingInterrupt::new());
    kick.write(1).unwrap();
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: blk.avail_features(),
        queues: vec![make_queue(&vq)],
        kicks: vec![kick.try_clone().unwrap()],
        interrupt: irq.clone(),
    };
    blk.activate(ctx).unwrap();
    assert!(eventually(|| used_idx(&mem) == 3));
    for i in 0..3u64 {
        let mut back = vec![0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA + 0x1000 * i))
            .unwrap();
        let s = (20 + i) as usize * 512;
        assert_eq!(back, bytes[s..s + 512]);
    }
    assert!(wait_readable(&irq.fd));
    assert_eq!(blk.metrics_snapshot().queues[0].req_in, 3);
    // Reset waits for anything in flight and stops the thread.
    blk.reset();
    assert!(!blk.is_active());
}

#[test]
fn an_engine_dropped_with_requests_in_flight_waits_for_them() {
    let mut f = NamedTempFile::new().unwrap();
    f.write_all(&vec![0x11u8; 8 << 20]).unwrap();
    let mem = Arc::new(guest_memory());
    let disk = Arc::new(DiskFile::open(f.path(), false, false, "").unwrap());
    let mut engine = engines::UringEngine::new(disk, QSIZE).unwrap();
    let mut submitted = 0;
    for i in 0..8u64 {
        let req = request::Request {
            request_type: request::RequestType::In,
            sector: i * 2048,
            data: vec![request::Segment {
                addr: GuestAddress(0x10_0000 * (i + 1)),
                len: 1 << 20,
            }],
            ranges: vec![],
            status_addr: GuestAddress(STATUS),
        };
        if engines::BlockEngine::submit(&mut engine, i as u16, &req, &mem)
            == engines::Submitted::InFlight
        {
            submitted += 1;
        }
    }
    assert_eq!(submitted, 8);
    engines::BlockEngine::start(&mut engine).unwrap();
    drop(engine);
    // The kernel is done with guest memory: what it read is all there.
    let mut back = vec![0u8; 1 << 20];
    mem.read_slice(&mut back, GuestAddress(0x80_0000)).unwrap();
    assert!(back.iter().all(|&b| b == 0x11));
}

#[test]
fn a_polling_worker_turns_kicks_off_and_finds_requests_without_them() {
    for kind in ENGINES {
        let (mem, f, bytes) = setup();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let mut blk = Block::new(BlockConfig {
            path: f.path().into(),
            readonly: false,
            id: None,
            queues: 1,
            direct: false,
            // A window far longer than the test needs (no option allows this much).
            poll: crate::poll::PollMode::Fixed(5_000_000),
            engine: EngineChoice::Only(kind),
        })
        .unwrap();
        let mut ring = DriverRing::of_mock(&vq);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
        ring.add_chain(
            &mem,
            &[
                Desc(HDR, 16, false),
                Desc(DATA, 512, true),
                Desc(STATUS, 1, true),
            ],
        );
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(RecordingInterrupt::new());
        kick.write(1).unwrap();
        let ctx = ActivateContext {
            mem: mem.clone(),
            acked_features: 1 << 32,
            queues: vec![make_queue(&vq)],
            kicks: vec![kick.try_clone().unwrap()],
            interrupt: irq.clone(),
        };
        blk.activate(ctx).unwrap();
        assert!(eventually(|| used_idx(&mem) == 1), "{kind}: first request");
        // Polling: the driver is asked not to kick.
        assert!(
            eventually(|| mem.read_obj::<u16>(GuestAddress(USED_ADDR)).unwrap() == 1),
            "{kind}: VRING_USED_F_NO_NOTIFY not set while polling"
        );
        // A second request, not kicked, as a driver that honours the flag does.
        header(&mem, HDR + 0x100, VIRTIO_BLK_T_IN, 3);
        ring.add_chain(
            &mem,
            &[
                Desc(HDR + 0x100, 16, false),
                Desc(DATA + 0x1000, 512, true),
                Desc(STATUS + 1, 1, true),
            ],
        );
        assert!(
            eventually(|| used_idx(&mem) == 2),
            "{kind}: not found by polling"
        );
        let mut back = vec![0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(back, bytes[3 * 512..4 * 512], "{kind}");
        let m = blk.metrics();
        // The first request may itself have been found by polling, before its kick.
        assert!(
            m["queues"][0]["kicks"].as_u64().unwrap() <= 1,
            "{kind}: {m}"
        );
        assert!(
            m["polling"]["polled_drains"].as_u64().unwrap() >= 1,
            "{kind}: {m}"
        );
        assert!(
            m["polling"]["polled_requests"].as_u64().unwrap() >= 1,
            "{kind}: {m}"
        );
        assert_eq!(m["poll"], "5000000");
        // A reset stops a worker in the middle of its window.
        let stopping = std::time::Instant::now();
        blk.reset();
        assert!(!blk.is_active());
        assert!(
            stopping.elapsed() < std::time::Duration::from_secs(4),
            "{kind}: the reset waited for the window to end"
        );
    }
}

#[test]
fn an_idle_disk_with_adaptive_polling_does_not_spin() {
    let (mem, f, _) = setup();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let mut blk = Block::new(BlockConfig {
        path: f.path().into(),
        readonly: false,
        id: None,
        queues: 1,
        direct: false,
        poll: crate::poll::PollMode::Adaptive,
        engine: EngineChoice::Only(EngineKind::IoUring),
    })
    .unwrap();
    let mut ring = DriverRing::of_mock(&vq);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(RecordingInterrupt::new());
    let ctx = ActivateContext {
        mem: mem.clone(),
        acked_features: 1 << 32,
        queues: vec![make_queue(&vq)],
        kicks: vec![kick.try_clone().unwrap()],
        interrupt: irq.clone(),
    };
    blk.activate(ctx).unwrap();
    // A few requests 20 ms apart, then nothing for half a second.
    for i in 0..5u16 {
        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        ring.add_chain(
            &mem,
            &[
                Desc(HDR, 16, false),
                Desc(DATA, 20, true),
                Desc(STATUS, 1, true),
            ],
        );
        kick.write(1).unwrap();
        assert!(eventually(|| used_idx(&mem) == i + 1));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = blk.metrics()["polling"]["poll_ns"].as_u64().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let m = blk.metrics();
    let idle = m["polling"]["poll_ns"].as_u64().unwrap() - before;
    assert_eq!(idle, 0, "polled {idle} ns while idle: {m}");
    // Gaps of 20 ms never grow the window past its first step (4 µs): five requests
    // cost a few windows at most (generous for a thread descheduled while it polls).
    assert!(
        before <= 5 * 4 * crate::poll::ADAPTIVE_MAX.as_nanos() as u64,
        "polled {before} ns for 5 requests 20 ms apart: {m}"
    );
}

mod hostile;
