//! Generated hostile requests through the in-VMM worker, with both engines: seeded
//! chains, valid by default and corrupted now and then (data outside memory, the wrong
//! direction, lengths that are not whole sectors, sectors past the end or near
//! u64::MAX, a status the device cannot write, a missing or short header, loops,
//! more segments than SEG_MAX, DISCARD past the end). After every request:
//! - nothing panicked;
//! - a valid request is answered OK (UNSUPP for an unknown type), a corrupted one with
//!   IOERR in its status byte, or with DEVICE_NEEDS_RESET where it has no status byte;
//! - guest memory changed only inside the chain's device-writable buffers and the used
//!   ring;
//! - the disk file equals a shadow copy kept by the test (a corrupted request writes
//!   nothing), and a sentinel past the disk's last sector is intact.
//!
//! `EVMM_SOAK_SEEDS=N cargo test -p evmm-virtio hostile` runs N seeds instead of the
//! default; a failing seed is printed and belongs in [`REGRESSION_SEEDS`].

use super::*;
use virtio_queue::desc::RawDescriptor;

/// Seeds that once failed, run every time.
const REGRESSION_SEEDS: &[u64] = &[];
/// Seeds run under `cargo test` (each with both engines).
const DEFAULT_SEEDS: u64 = 6;
/// Requests per seed.
const REQUESTS: usize = 250;

const MEM: u64 = 1 << 20;
const DISK_SECTORS: u64 = 128;
const SENTINEL: &[u8] = b"sentinel past the last sector: never to be touched by the device";
const HDR_AT: u64 = 0x2_0000;
const TABLE_AT: u64 = 0x3_0000;
const DATA_START: u64 = 0x4_0000;
const DATA_END: u64 = 0xf_0000;
const STATUS_AT: u64 = 0xf_8000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Corruption {
    None,
    DataOutside,
    WrongDirection,
    Unaligned,
    SectorPastEnd,
    SectorNearMax,
    StatusReadOnly,
    StatusEmpty,
    NoStatus,
    HeaderShort,
    Loop,
    TooManySegments,
    DiscardPastEnd,
}

/// What the device must do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Status(u32),
    NeedsReset,
    /// A used entry with IOERR, or DEVICE_NEEDS_RESET (a loop: where the chain ends
    /// depends on how far the device follows it).
    IoerrOrReset,
}

struct Generated {
    /// The descriptors put in the queue's table.
    descs: Vec<RawDescriptor>,
    /// Address of the byte the device answers in: the last byte of the chain's last
    /// descriptor.
    status_at: u64,
    writable: Vec<(u64, u64)>,
    corruption: Corruption,
    expect: Expect,
    /// What a valid OUT, DISCARD or WRITE_ZEROES does to the disk: (offset, bytes).
    disk_writes: Vec<(u64, Vec<u8>)>,
    /// A valid IN: (guest address, disk offset, length) of each segment.
    reads: Vec<(u64, u64, u64)>,
}

fn desc(addr: u64, len: u32, write: bool) -> (u64, u32, u32) {
    (addr, len, if write { VRING_DESC_F_WRITE } else { 0 })
}

/// Links `parts` (address, length, flags) into a chain starting at table index 0.
fn link(parts: &[(u64, u32, u32)]) -> Vec<RawDescriptor> {
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i + 1 == parts.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            raw_desc(addr, len, flags, if last { 0 } else { i as u16 + 1 })
        })
        .collect()
}

fn generate(rng: &mut SeededRng, mem: &GuestMemoryMmap) -> Generated {
    let corruption = if rng.chance(75) {
        Corruption::None
    } else {
        match rng.below(12) {
            0 => Corruption::DataOutside,
            1 => Corruption::WrongDirection,
            2 => Corruption::Unaligned,
            3 => Corruption::SectorPastEnd,
            4 => Corruption::SectorNearMax,
            5 => Corruption::StatusReadOnly,
            6 => Corruption::StatusEmpty,
            7 => Corruption::NoStatus,
            8 => Corruption::HeaderShort,
            9 => Corruption::Loop,
            10 => Corruption::TooManySegments,
            _ => Corruption::DiscardPastEnd,
        }
    };
    let request_type = match corruption {
        Corruption::DiscardPastEnd => VIRTIO_BLK_T_DISCARD,
        // Without a status descriptor an IN's last data buffer would be taken for the
        // status (its last byte): only a chain that ends device-readable has none.
        Corruption::NoStatus => VIRTIO_BLK_T_OUT,
        // A short header descriptor followed by device-readable data is just a header
        // split across descriptors; before device-writable data it is too short.
        Corruption::HeaderShort => VIRTIO_BLK_T_IN,
        Corruption::None | Corruption::StatusReadOnly | Corruption::StatusEmpty => {
            match rng.below(20) {
                0..=6 => VIRTIO_BLK_T_IN,
                7..=13 => VIRTIO_BLK_T_OUT,
                14 | 15 => VIRTIO_BLK_T_FLUSH,
                16 => VIRTIO_BLK_T_GET_ID,
                17 => VIRTIO_BLK_T_DISCARD,
                18 => VIRTIO_BLK_T_WRITE_ZEROES,
                _ => 0x55,
            }
        }
        _ => {
            if rng.chance(50) {
                VIRTIO_BLK_T_IN
            } else {
                VIRTIO_BLK_T_OUT
            }
        }
    };
    let device_writes = matches!(request_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);

    // Data segments: sequential in the data area with random gaps, so that they never
    // overlap one another.
    let mut at = DATA_START + rng.below(4096);
    let mut segments: Vec<(u64, u32)> = Vec::new();
    let mut disk_writes = Vec::new();
    let mut reads = Vec::new();
    let mut sector = 0u64;
    match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let n = 1 + rng.below(4);
            for _ in 0..n {
                let len = 512 * (1 + rng.below(4)) as u32;
                segments.push((at, len));
                at += u64::from(len) + rng.below(2048);
            }
            let total: u64 = segments.iter().map(|s| u64::from(s.1)).sum();
            sector = rng.below(DISK_SECTORS - total / 512 + 1);
            // Random contents for an OUT.
            for &(addr, len) in &segments {
                let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            }
        }
        VIRTIO_BLK_T_GET_ID => segments.push((at, 20)),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let first = rng.below(DISK_SECTORS);
            let mut count = 1 + rng.below(DISK_SECTORS - first);
            if corruption == Corruption::DiscardPastEnd {
                count = DISK_SECTORS - first + 1 + rng.below(4);
            }
            let flags = if request_type == VIRTIO_BLK_T_WRITE_ZEROES && rng.chance(50) {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            let mut r = [0u8; 16];
            r[..8].copy_from_slice(&first.to_le_bytes());
            r[8..12].copy_from_slice(&(count as u32).to_le_bytes());
            r[12..].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&r, GuestAddress(at)).unwrap();
            segments.push((at, 16));
            disk_writes.push((first * 512, vec![0u8; (count * 512) as usize]));
        }
        _ => {}
    }
    assert!(
        at <= DATA_END,
        "the data area is too small for the generator"
    );
    if request_type == VIRTIO_BLK_T_OUT {
        let mut offset = sector * 512;
        for &(addr, len) in &segments {
            let mut bytes = vec![0u8; len as usize];
            mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            disk_writes.push((offset, bytes));
            offset += u64::from(len);
        }
    }
    if request_type == VIRTIO_BLK_T_IN {
        let mut offset = sector * 512;
        for &(addr, len) in &segments {
            reads.push((addr, offset, u64::from(len)));
            offset += u64::from(len);
        }
    }

    // The corruption, on the request as built.
    let mut header_len = 16u32;
    let mut status = desc(STATUS_AT + rng.below(256), 1, true);
    let mut data: Vec<(u64, u32, u32)> = segments
        .iter()
        .map(|&(a, l)| desc(a, l, device_writes))
        .collect();
    match corruption {
        Corruption::DataOutside => {
            if let Some(d) = data.first_mut() {
                d.0 = MEM + rng.below(1 << 30);
            }
        }
        Corruption::WrongDirection => {
            if let Some(d) = data.last_mut() {
                d.2 ^= VRING_DESC_F_WRITE;
            }
        }
        Corruption::Unaligned => {
            if let Some(d) = data.last_mut() {
                d.1 += 1 + rng.below(511) as u32;
            }
        }
        Corruption::SectorPastEnd => {
            // The request's last sector lies past the disk's end.
            let sectors: u64 = data.iter().map(|d| u64::from(d.1) / 512).sum();
            sector = (DISK_SECTORS + 1 + rng.below(3)).saturating_sub(sectors.max(1));
        }
        Corruption::SectorNearMax => sector = u64::MAX - rng.below(16),
        Corruption::StatusReadOnly => status.2 = 0,
        Corruption::StatusEmpty => status.1 = 0,
        Corruption::HeaderShort => header_len = 1 + rng.below(15) as u32,
        _ => {}
    }
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR_AT)).unwrap();
    let header = desc(HDR_AT, header_len, false);

    // The layout: header, data and status in descriptors of their own, or (VERSION_1
    // lets a driver do this) the header split in two, an OUT's first data in the
    // header's descriptor, an IN's last data in the status byte's descriptor.
    let mut parts = vec![header];
    parts.extend(data.iter().copied());
    if corruption == Corruption::None {
        match rng.below(10) {
            0 | 1 => parts
                .splice(0..1, [desc(HDR_AT, 8, false), desc(HDR_AT + 8, 8, false)])
                .for_each(drop),
            2 | 3 if request_type == VIRTIO_BLK_T_OUT && parts.len() > 1 => {
                let first = parts.remove(1);
                mem.write_slice(&h, GuestAddress(first.0 - 16)).unwrap();
                parts[0] = (first.0 - 16, first.1 + 16, 0);
            }
            4 if request_type == VIRTIO_BLK_T_IN && parts.len() > 1 => {
                // The status byte right after the last data buffer, in its descriptor.
                let last = parts.pop().unwrap();
                status = (last.0, last.1 + 1, VRING_DESC_F_WRITE);
            }
            _ => {}
        }
    }
    // What the chain holds, whether direct or in an indirect table.
    let mut chain = parts.clone();
    let descs = match corruption {
        Corruption::NoStatus => link(&parts),
        Corruption::Loop => {
            // The last descriptor points back at the header; no status at the end.
            let mut d = link(&parts);
            let last = d.len() - 1;
            let (addr, len, flags) = parts[last];
            d[last] = raw_desc(addr, len, flags | VRING_DESC_F_NEXT, 0);
            d
        }
        Corruption::TooManySegments => {
            // An indirect table: header, SEG_MAX + 1 one-sector segments, status.
            let mut t = vec![header];
            for i in 0..=u64::from(config::SEG_MAX) {
                t.push(desc(DATA_START + 512 * (i % 64), 512, device_writes));
            }
            t.push(status);
            let table = link(&t);
            chain = t;
            for (i, d) in table.iter().enumerate() {
                mem.write_obj(*d, GuestAddress(TABLE_AT + 16 * i as u64))
                    .unwrap();
            }
            vec![raw_desc(
                TABLE_AT,
                16 * table.len() as u32,
                VRING_DESC_F_INDIRECT,
                0,
            )]
        }
        _ => {
            parts.push(status);
            chain = parts.clone();
            link(&parts)
        }
    };
    let writable = chain
        .iter()
        .filter(|d| d.2 & VRING_DESC_F_WRITE != 0)
        .map(|d| (d.0, u64::from(d.1)))
        .collect();
    let status_at = chain.last().map_or(0, |d| d.0 + u64::from(d.1.max(1)) - 1);
    let valid = corruption == Corruption::None;
    let expect = match corruption {
        Corruption::None if request_type == 0x55 => Expect::Status(VIRTIO_BLK_S_UNSUPP),
        Corruption::None => Expect::Status(VIRTIO_BLK_S_OK),
        Corruption::StatusReadOnly | Corruption::StatusEmpty | Corruption::NoStatus => {
            Expect::NeedsReset
        }
        Corruption::Loop => Expect::IoerrOrReset,
        _ => Expect::Status(VIRTIO_BLK_S_IOERR),
    };
    Generated {
        descs,
        status_at,
        writable,
        corruption,
        expect,
        disk_writes: if valid { disk_writes } else { Vec::new() },
        reads: if valid { reads } else { Vec::new() },
    }
}

/// The used ring's bytes: the device may write there.
fn in_used_ring(addr: u64) -> bool {
    (USED_ADDR..USED_ADDR + 6 + 8 * u64::from(QSIZE)).contains(&addr)
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; MEM as usize];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

fn image() -> (NamedTempFile, Vec<u8>) {
    let mut f = NamedTempFile::new().unwrap();
    let disk: Vec<u8> = (0..DISK_SECTORS as usize * 512).map(pattern).collect();
    f.write_all(&disk).unwrap();
    f.write_all(SENTINEL).unwrap();
    f.flush().unwrap();
    (f, disk)
}

/// A fresh device on `file` (as after a driver reset).
fn device(
    mem: &GuestMemoryMmap,
    file: &NamedTempFile,
    kind: EngineKind,
) -> (MockSplitQueue<'static, GuestMemoryMmap>, Harness) {
    // The mock queue borrows the memory for its lifetime; the test keeps the memory for
    // as long as the process runs.
    let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
    // A driver sets its rings up afresh after a reset.
    mem.write_slice(&vec![0u8; USED_ADDR as usize + 0x1000], GuestAddress(0))
        .unwrap();
    let vq = MockSplitQueue::new(leaked, QSIZE);
    let disk = DiskFile::open(file.path(), false, false, "hostile").unwrap();
    let h = Harness::with_engine(mem, &vq, disk, kind);
    (vq, h)
}

/// Runs one seed; returns (requests, corrupted ones, resets).
fn run_seed(seed: u64, kind: EngineKind) -> (usize, usize, usize) {
    let mut rng = SeededRng::new(seed);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let (file, mut shadow) = image();
    let (mut vq, mut h) = device(&mem, &file, kind);
    let (mut corrupted, mut resets) = (0, 0);
    for n in 0..REQUESTS {
        let what = format!("seed {seed} ({kind}), request {n}");
        let g = generate(&mut rng, &mem);
        if g.corruption != Corruption::None {
            corrupted += 1;
        }
        let status_at = g.status_at;
        mem.write_obj(0xeeu8, GuestAddress(status_at)).ok();
        vq.add_desc_chains(&g.descs, 0).unwrap();
        let before = snapshot(&mem);
        let used_before = used_idx(&mem);
        let answered = h.run();
        let after = snapshot(&mem);

        // Guest memory: only writable buffers and the used ring (compared a page at a
        // time, bytes only in pages that differ).
        for (page, (b, a)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
            if b == a {
                continue;
            }
            for (i, (x, y)) in b.iter().zip(a).enumerate() {
                let addr = (page * 4096 + i) as u64;
                if x != y {
                    let allowed = in_used_ring(addr)
                        || g.writable
                            .iter()
                            .any(|&(start, len)| (start..start + len).contains(&addr));
                    assert!(
                        allowed,
                        "{what}: {:?} changed guest memory at {addr:#x} outside its writable buffers",
                        g.corruption
                    );
                }
            }
        }
        // The answer.
        let reset = h.irq.needs_reset();
        match g.expect {
            Expect::Status(want) => {
                assert!(!reset, "{what}: {:?} set NEEDS_RESET", g.corruption);
                assert_eq!(answered, 1, "{what}: {:?} not answered", g.corruption);
                assert_eq!(used_idx(&mem), used_before.wrapping_add(1), "{what}");
                let got: u8 = mem.read_obj(GuestAddress(status_at)).unwrap();
                assert_eq!(
                    got, want as u8,
                    "{what}: {:?} answered {got}, not {want}",
                    g.corruption
                );
            }
            Expect::NeedsReset => {
                assert!(reset, "{what}: {:?} without NEEDS_RESET", g.corruption);
                assert_eq!(used_idx(&mem), used_before, "{what}: a used entry");
            }
            Expect::IoerrOrReset => {
                let got: u8 = mem.read_obj(GuestAddress(status_at)).unwrap();
                assert!(
                    reset || got == VIRTIO_BLK_S_IOERR as u8,
                    "{what}: {:?}: status {got}, no reset",
                    g.corruption
                );
            }
        }
        // The disk: the shadow, plus what a valid request wrote; the sentinel.
        for (offset, bytes) in &g.disk_writes {
            let o = *offset as usize;
            shadow[o..o + bytes.len()].copy_from_slice(bytes);
        }
        let on_disk = file_bytes(&file);
        assert_eq!(
            &on_disk[..shadow.len()],
            &shadow[..],
            "{what}: {:?}: the disk differs from its shadow",
            g.corruption
        );
        assert_eq!(&on_disk[shadow.len()..], SENTINEL, "{what}: the sentinel");
        // A valid IN read what the shadow holds.
        for &(addr, offset, len) in &g.reads {
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert_eq!(
                &got[..],
                &shadow[offset as usize..(offset + len) as usize],
                "{what}: IN data"
            );
        }
        if reset {
            // The driver resets the device and sets the queue up again.
            resets += 1;
            drop(h);
            (vq, h) = device(&mem, &file, kind);
        }
    }
    (REQUESTS, corrupted, resets)
}

#[test]
fn generated_hostile_chains_never_escape_their_buffers_or_corrupt_the_disk() {
    let seeds = soak_seeds(DEFAULT_SEEDS);
    let (mut requests, mut corrupted, mut resets) = (0, 0, 0);
    for seed in REGRESSION_SEEDS.iter().copied().chain(0..seeds) {
        for kind in [EngineKind::Sync, EngineKind::IoUring] {
            let (r, c, n) = run_seed(seed, kind);
            requests += r;
            corrupted += c;
            resets += n;
        }
    }
    eprintln!(
        "hostile chains: {} seeds, {requests} requests ({corrupted} corrupted, {resets} \
         device resets) through both engines: no panic, no write outside a writable \
         buffer, the disk equal to its shadow",
        seeds as usize + REGRESSION_SEEDS.len()
    );
    assert!(
        corrupted > 0 && resets > 0,
        "the generator must corrupt requests"
    );
}
