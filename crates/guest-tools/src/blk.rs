//! Block-device checks run in the guest, and their host-side counterparts on the disk
//! file: a known pattern at known offsets, and a verified random workload.
//!
//! All guest I/O uses O_DIRECT with 4 KiB-aligned buffers, so it reaches the device
//! rather than the guest's page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Sector size of the I/O.
pub const SECTOR: u64 = 512;

/// Offsets (bytes) and lengths of the pattern the guest writes: odd places on purpose
/// (sector 1, across a 4 KiB boundary, past 1 MiB, the last 4 KiB of a 64 MiB disk).
pub const GUEST_PATTERN: &[(u64, usize)] = &[
    (512, 512),
    (7 * 512, 4096),
    (1024 * 1024 + 3 * 512, 64 * 1024),
    (64 * 1024 * 1024 - 4096, 4096),
];

/// Where the host writes the pattern the guest reads back.
pub const HOST_PATTERN: &[(u64, usize)] = &[(0, 4096), (5 * 1024 * 1024 + 512, 128 * 1024)];

/// The pattern's byte at `offset` (a function of the offset and a seed, so misplaced
/// data shows).
pub fn pattern_byte(offset: u64, seed: u8) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56;
    (x as u8) ^ seed ^ ((offset / SECTOR) as u8)
}

/// The pattern for `len` bytes at `offset`.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(offset + i, seed))
        .collect()
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (a multiple of 512) aligned to 4 KiB.
    pub fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(SECTOR as usize), 4096)
            .expect("aligned layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, layout }
    }

    /// The first `len` bytes.
    pub fn slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.layout.size());
        // SAFETY: ptr is valid for layout.size() bytes, owned by self, and borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr came from alloc_zeroed with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Opens a block device for O_DIRECT I/O.
pub fn open_direct(dev: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
}

/// Writes [`GUEST_PATTERN`] with O_DIRECT and fsyncs.
pub fn write_guest_pattern(dev: &Path) -> io::Result<()> {
    let f = open_direct(dev, true)?;
    for &(offset, len) in GUEST_PATTERN {
        let mut buf = AlignedBuf::new(len);
        buf.slice(len).copy_from_slice(&pattern(offset, len, 0xa5));
        f.write_all_at(buf.slice(len), offset)?;
    }
    f.sync_all()
}

/// Size of the blocks of [`write_flush_and_keep_writing`].
pub const FLUSHED_BLOCK: usize = 4096;

/// Block `i` of [`write_flush_and_keep_writing`]'s acknowledged writes.
pub fn flushed_block(i: u64) -> Vec<u8> {
    pattern(i * FLUSHED_BLOCK as u64, FLUSHED_BLOCK, 0x3c)
}

/// Writes `blocks` distinct 4 KiB blocks from the start of `dev` (O_DIRECT, one write
/// each), makes them durable (fdatasync: a FLUSH), calls `flushed`, then writes random
/// data past them without end, so that requests are in flight whenever the VMM is
/// killed. Returns only on an error.
pub fn write_flush_and_keep_writing(
    dev: &Path,
    blocks: u64,
    flushed: impl FnOnce(),
) -> io::Result<()> {
    let f = open_direct(dev, true)?;
    let len = device_len(&f)?;
    let end = blocks * FLUSHED_BLOCK as u64;
    if end + 64 * FLUSHED_BLOCK as u64 > len {
        return Err(io::Error::other(
            "the disk is too small for that many blocks",
        ));
    }
    let mut buf = AlignedBuf::new(FLUSHED_BLOCK);
    for i in 0..blocks {
        buf.slice(FLUSHED_BLOCK).copy_from_slice(&flushed_block(i));
        f.write_all_at(buf.slice(FLUSHED_BLOCK), i * FLUSHED_BLOCK as u64)?;
    }
    f.sync_data()?;
    flushed();
    let mut rng = Rng::new(blocks);
    let spare = (len - end) / FLUSHED_BLOCK as u64;
    loop {
        for b in buf.slice(FLUSHED_BLOCK).iter_mut() {
            *b = rng.next_u64() as u8;
        }
        let at = end + rng.range(0, spare - 1) * FLUSHED_BLOCK as u64;
        f.write_all_at(buf.slice(FLUSHED_BLOCK), at)?;
    }
}

/// The blocks among the first `blocks` of `file` that differ from what
/// [`write_flush_and_keep_writing`] wrote and flushed.
pub fn verify_flushed_file(file: &Path, blocks: u64) -> io::Result<u64> {
    let data = std::fs::read(file)?;
    Ok((0..blocks)
        .filter(|&i| {
            let at = (i as usize) * FLUSHED_BLOCK;
            data.get(at..at + FLUSHED_BLOCK) != Some(flushed_block(i).as_slice())
        })
        .count() as u64)
}

/// Reads [`HOST_PATTERN`] with O_DIRECT; the number of bytes that differ.
pub fn verify_host_pattern(dev: &Path) -> io::Result<usize> {
    let f = open_direct(dev, false)?;
    let mut bad = 0;
    for &(offset, len) in HOST_PATTERN {
        let mut buf = AlignedBuf::new(len);
        f.read_exact_at(buf.slice(len), offset)?;
        bad += count_diff(buf.slice(len), &pattern(offset, len, 0x3c));
    }
    Ok(bad)
}

/// Host side: writes [`HOST_PATTERN`] into a disk file.
pub fn write_host_pattern(file: &Path) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(file)?;
    for &(offset, len) in HOST_PATTERN {
        f.write_all_at(&pattern(offset, len, 0x3c), offset)?;
    }
    f.sync_all()
}

/// Host side: the number of bytes of a disk file that differ from "zeros with
/// [`GUEST_PATTERN`] written".
pub fn verify_guest_pattern_file(file: &Path) -> io::Result<usize> {
    let data = std::fs::read(file)?;
    let mut expected = vec![0u8; data.len()];
    for &(offset, len) in GUEST_PATTERN {
        let at = offset as usize;
        if at + len <= expected.len() {
            expected[at..at + len].copy_from_slice(&pattern(offset, len, 0xa5));
        }
    }
    Ok(count_diff(&data, &expected))
}

fn count_diff(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len())
}

/// What a write to a read-only disk did.
#[derive(Debug)]
pub struct ReadonlyOutcome {
    /// The error of opening the device for writing, if the kernel refused that.
    pub open_error: Option<io::Error>,
    /// The error of an O_DIRECT write of 4 KiB at offset 0 (None: the write went through).
    pub write_error: Option<io::Error>,
}

impl ReadonlyOutcome {
    /// The write was refused: at open, or by the guest kernel (EPERM: it knows the disk
    /// is read-only from VIRTIO_BLK_F_RO), or by the device (EIO).
    pub fn refused(&self) -> bool {
        self.open_error.is_some()
            || matches!(
                self.write_error.as_ref().and_then(io::Error::raw_os_error),
                Some(libc::EPERM) | Some(libc::EIO) | Some(libc::EROFS)
            )
    }
}

/// Tries an O_DIRECT write to a read-only disk. Linux 6.1 refuses it itself (the
/// device announced VIRTIO_BLK_F_RO, and BLKROSET cannot lift a disk-wide read-only
/// flag), so the device's own IOERR answer is covered by evmm-virtio's unit tests.
pub fn try_readonly_write(dev: &Path) -> io::Result<ReadonlyOutcome> {
    let f = match open_direct(dev, true) {
        Ok(f) => f,
        Err(e) => {
            return Ok(ReadonlyOutcome {
                open_error: Some(e),
                write_error: None,
            })
        }
    };
    let mut buf = AlignedBuf::new(4096);
    buf.slice(4096).fill(0xee);
    let write_error = f
        .write_all_at(buf.slice(4096), 0)
        .and_then(|_| f.sync_all())
        .err();
    Ok(ReadonlyOutcome {
        open_error: None,
        write_error,
    })
}

/// A small deterministic generator (xorshift64*), so a workload can be replayed.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; neighbouring seeds give unrelated
    /// sequences: the seed is mixed, splitmix64-style, into a non-zero state).
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(z.max(1))
    }
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Result of [`random_workload`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkloadReport {
    /// Reads done.
    pub reads: u64,
    /// Writes done.
    pub writes: u64,
    /// Flushes (fdatasync) done.
    pub flushes: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Bytes read that differed from what was last written there.
    pub mismatches: u64,
    /// FNV-1a of the whole disk as the workload left it (its in-memory shadow).
    pub checksum: u64,
}

impl WorkloadReport {
    /// The one-line form the host-side tests parse.
    pub fn line(&self) -> String {
        format!(
            "EVMM-BLK-RANDOM reads={} writes={} flushes={} bytes={} mismatches={} checksum={:016x}",
            self.reads, self.writes, self.flushes, self.bytes, self.mismatches, self.checksum
        )
    }
}

/// FNV-1a over `data`.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `ops` random reads and writes (60/40), sizes 512 B–128 KiB at sector-aligned
/// offsets, each read checked against an in-memory shadow of the disk, which starts as
/// a copy of the disk's content (read first), so the workload runs on any disk.
pub fn random_workload(
    dev: &File,
    disk_len: u64,
    ops: u64,
    seed: u64,
) -> io::Result<WorkloadReport> {
    random_workload_parallel(dev, disk_len, ops, seed, 1)
}

/// [`random_workload`] by `threads` threads at once, each on its own slice of the disk
/// (so the device has up to `threads` requests in flight, which it may complete in any
/// order), each slice checked against its part of the shadow.
pub fn random_workload_parallel(
    dev: &File,
    disk_len: u64,
    ops: u64,
    seed: u64,
    threads: u64,
) -> io::Result<WorkloadReport> {
    let threads = threads.max(1);
    let mut shadow = vec![0u8; disk_len as usize];
    let mut buf = AlignedBuf::new(128 * 1024);
    for (at, chunk) in shadow.chunks_mut(128 * 1024).enumerate() {
        let len = chunk.len();
        dev.read_exact_at(buf.slice(len), (at * 128 * 1024) as u64)?;
        chunk.copy_from_slice(buf.slice(len));
    }
    let slice_len = (disk_len / threads / SECTOR * SECTOR) as usize;
    if slice_len == 0 {
        return Err(io::Error::other(
            "the disk is too small for that many threads",
        ));
    }
    let reports: Vec<io::Result<WorkloadReport>> = std::thread::scope(|s| {
        let workers: Vec<_> = shadow
            .chunks_mut(slice_len)
            .take(threads as usize)
            .enumerate()
            .map(|(i, part)| {
                let i = i as u64;
                let share = ops / threads + u64::from(i < ops % threads);
                let seed = if threads == 1 {
                    seed
                } else {
                    seed.wrapping_add(i)
                };
                s.spawn(move || workload_on(dev, i * slice_len as u64, part, share, seed))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a thread panicked")))
            })
            .collect()
    });
    let mut report = WorkloadReport::default();
    for r in reports {
        let r = r?;
        report.reads += r.reads;
        report.writes += r.writes;
        report.flushes += r.flushes;
        report.bytes += r.bytes;
        report.mismatches += r.mismatches;
    }
    dev.sync_all()?;
    report.checksum = fnv1a(&shadow);
    Ok(report)
}

/// The workload on the part of the disk that starts at `base` and that `shadow` mirrors.
fn workload_on(
    dev: &File,
    base: u64,
    shadow: &mut [u8],
    ops: u64,
    seed: u64,
) -> io::Result<WorkloadReport> {
    let mut rng = Rng::new(seed);
    let mut buf = AlignedBuf::new(128 * 1024);
    let mut report = WorkloadReport::default();
    let sectors = shadow.len() as u64 / SECTOR;
    for _ in 0..ops {
        let len_sectors = rng.range(1, 256).min(sectors);
        let start = rng.range(0, sectors - len_sectors) * SECTOR;
        let len = (len_sectors * SECTOR) as usize;
        let at = start as usize;
        if rng.range(0, 99) < 40 {
            for b in buf.slice(len).iter_mut() {
                *b = rng.next_u64() as u8;
            }
            dev.write_all_at(buf.slice(len), base + start)?;
            shadow[at..at + len].copy_from_slice(buf.slice(len));
            report.writes += 1;
            if rng.range(0, 99) < 5 {
                dev.sync_data()?;
                report.flushes += 1;
            }
        } else {
            dev.read_exact_at(buf.slice(len), base + start)?;
            report.mismatches += count_diff(buf.slice(len), &shadow[at..at + len]) as u64;
            report.reads += 1;
        }
        report.bytes += len as u64;
    }
    Ok(report)
}

/// Result of [`random_reads`]: latency percentiles (µs, nearest rank) and IOPS.
#[derive(Debug, Clone, PartialEq)]
pub struct QdReport {
    /// Reads in flight at once.
    pub depth: usize,
    /// Reads done.
    pub n: usize,
    /// Reads per second over the whole run.
    pub iops: f64,
    /// Latency percentiles and mean, µs.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Mean.
    pub mean: f64,
}

impl QdReport {
    /// The one-line form the benchmark parses.
    pub fn line(&self) -> String {
        format!(
            "EVMM-BLK-QD depth={} n={} iops={:.0} p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} mean_us={:.1}",
            self.depth, self.n, self.iops, self.p50, self.p90, self.p99, self.p999, self.mean
        )
    }
}

/// `n` random 4 KiB O_DIRECT reads, each timed, with `depth` of them in flight at once
/// (one thread per slot, each reading synchronously: queue depth `depth`).
pub fn random_reads(
    dev: &File,
    disk_len: u64,
    depth: usize,
    n: usize,
    seed: u64,
) -> io::Result<QdReport> {
    let blocks = disk_len / 4096;
    if blocks == 0 || n == 0 || depth == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty disk, no reads or depth 0",
        ));
    }
    let start = std::time::Instant::now();
    let per_slot: Vec<io::Result<Vec<f64>>> = std::thread::scope(|scope| {
        let slots: Vec<_> = (0..depth)
            .map(|slot| {
                // Slot `slot` does reads slot, slot + depth, ...: n in all.
                let count = (n - slot).div_ceil(depth);
                scope.spawn(move || -> io::Result<Vec<f64>> {
                    let mut rng = Rng::new(seed.wrapping_add(slot as u64));
                    let mut buf = AlignedBuf::new(4096);
                    let mut lat = Vec::with_capacity(count);
                    for _ in 0..count {
                        let offset = rng.range(0, blocks - 1) * 4096;
                        let t = std::time::Instant::now();
                        dev.read_exact_at(buf.slice(4096), offset)?;
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    Ok(lat)
                })
            })
            .collect();
        slots
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a reader thread panicked")))
            })
            .collect()
    });
    let total = start.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(n);
    for slot in per_slot {
        lat.extend(slot?);
    }
    lat.sort_by(f64::total_cmp);
    let rank = |permille: usize| lat[(permille * n).div_ceil(1000).clamp(1, n) - 1];
    Ok(QdReport {
        depth,
        n,
        iops: n as f64 / total,
        p50: rank(500),
        p90: rank(900),
        p99: rank(990),
        p999: rank(999),
        mean: lat.iter().sum::<f64>() / n as f64,
    })
}

/// The size of a block device or file in bytes.
pub fn device_len(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zero-filled read-write file of `len` bytes in a temporary folder.
    fn scratch_disk(len: u64) -> (tempfile::TempDir, std::path::PathBuf, File) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&file)
            .unwrap();
        f.set_len(len).unwrap();
        (dir, file, f)
    }

    #[test]
    fn patterns_depend_on_offset_and_seed() {
        assert_ne!(pattern(0, 512, 1), pattern(512, 512, 1));
        assert_ne!(pattern(0, 512, 1), pattern(0, 512, 2));
        assert_eq!(pattern(4096, 16, 7), pattern(4096, 16, 7));
    }

    #[test]
    fn guest_pattern_file_check_finds_every_stray_byte() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk");
        let f = File::create(&file).unwrap();
        f.set_len(64 << 20).unwrap();
        for &(offset, len) in GUEST_PATTERN {
            f.write_all_at(&pattern(offset, len, 0xa5), offset).unwrap();
        }
        assert_eq!(verify_guest_pattern_file(&file).unwrap(), 0);
        f.write_all_at(&[1], 10 << 20).unwrap();
        assert_eq!(verify_guest_pattern_file(&file).unwrap(), 1);
    }

    #[test]
    fn flushed_blocks_are_verified_block_by_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let mut data = vec![0u8; 8 * FLUSHED_BLOCK];
        for i in 0..8u64 {
            let at = i as usize * FLUSHED_BLOCK;
            data[at..at + FLUSHED_BLOCK].copy_from_slice(&flushed_block(i));
        }
        std::fs::write(&path, &data).unwrap();
        assert_eq!(verify_flushed_file(&path, 8).unwrap(), 0);
        data[3 * FLUSHED_BLOCK + 17] ^= 1;
        data[5 * FLUSHED_BLOCK] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert_eq!(verify_flushed_file(&path, 8).unwrap(), 2);
        // A file cut short: the missing blocks count as lost.
        std::fs::write(&path, &data[..6 * FLUSHED_BLOCK]).unwrap();
        assert_eq!(verify_flushed_file(&path, 8).unwrap(), 4);
    }

    #[test]
    fn a_parallel_workload_on_a_file_matches_its_shadow() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        let report = random_workload_parallel(&f, 4 << 20, 400, 9, 4).unwrap();
        assert_eq!(report.mismatches, 0);
        assert_eq!(report.reads + report.writes, 400);
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut all).unwrap();
        assert_eq!(fnv1a(&all), report.checksum);
    }

    #[test]
    fn random_workload_on_a_file_matches_its_shadow() {
        let (_dir, file, f) = scratch_disk(4 << 20);
        // Content before the workload is part of the shadow.
        f.write_all_at(&pattern(4096, 8192, 9), 4096).unwrap();
        let report = random_workload(&f, 4 << 20, 500, 42).unwrap();
        assert_eq!(report.mismatches, 0);
        assert_eq!(report.reads + report.writes, 500);
        assert_eq!(report.checksum, fnv1a(&std::fs::read(&file).unwrap()));
    }

    #[test]
    fn random_reads_at_each_depth_do_n_reads() {
        let (_dir, _file, f) = scratch_disk(1 << 20);
        for depth in [1, 7, 32] {
            let r = random_reads(&f, 1 << 20, depth, 201, 1).unwrap();
            assert_eq!(r.n, 201);
            assert!(r.p50 <= r.p90 && r.p90 <= r.p99 && r.p99 <= r.p999);
            assert!(r.iops > 0.0);
            assert!(r
                .line()
                .starts_with(&format!("EVMM-BLK-QD depth={depth} n=201 ")));
        }
        assert!(random_reads(&f, 1 << 20, 0, 10, 1).is_err());
    }

    #[test]
    fn neighbouring_seeds_give_different_sequences() {
        // Threads of one workload are seeded seed, seed + 1, ...
        for seed in [0u64, 2, 6, 1 << 40] {
            let (mut a, mut b) = (Rng::new(seed), Rng::new(seed + 1));
            let same = (0..16).filter(|_| a.next_u64() == b.next_u64()).count();
            assert_eq!(same, 0, "seeds {seed} and {}", seed + 1);
        }
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            let x = a.range(3, 9);
            assert_eq!(x, b.range(3, 9));
            assert!((3..=9).contains(&x));
        }
    }
}
