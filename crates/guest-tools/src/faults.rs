//! Disk fault checks. In the guest: seeded data made durable by a flush, after which
//! the VMM (or its vhost-user daemon) is killed; and a probe of a disk whose writes or
//! flushes fail. On the host: the disk file's copy of the durable data.

use crate::blk::{device_len, open_direct, AlignedBuf, Rng, SECTOR};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The durable extents lie below this offset; the writes that follow the flush lie
/// at or above it.
pub const DURABLE_AREA: u64 = 32 << 20;

/// Each extent lies in a slot of its own, a page or more from the slot's ends, so that
/// no two extents share a guest page (some are written through the guest's page cache,
/// the others O_DIRECT).
const SLOT: u64 = 2 << 20;

/// Number of durable extents.
pub const EXTENTS: u64 = DURABLE_AREA / SLOT;

/// The extents `(offset, len)` of the durable data for `seed`: one per slot, 64 KiB to
/// 512 KiB long at a seed-chosen sector offset (so most are not page-aligned).
pub fn durable_extents(seed: u64) -> Vec<(u64, usize)> {
    let mut rng = seeded(seed);
    (0..EXTENTS)
        .map(|i| {
            let len = rng.range(128, 1024) * SECTOR;
            let room = (SLOT - len - 2 * 4096) / SECTOR;
            let offset = i * SLOT + 4096 + rng.range(0, room) * SECTOR;
            (offset, len as usize)
        })
        .collect()
}

/// The generator of `seed`.
fn seeded(seed: u64) -> Rng {
    Rng::new(seed)
}

/// The seeded content of extent `index` of `seed`.
pub fn extent_data(seed: u64, index: usize, len: usize) -> Vec<u8> {
    let mut rng = seeded(seed.wrapping_mul(1_000_003).wrapping_add(index as u64 + 1));
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    data.truncate(len);
    data
}

/// What the durable data of a seed is: its size and SHA-256 (of the extents in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableSum {
    /// Bytes in all extents.
    pub bytes: u64,
    /// SHA-256 of the extents' bytes, in order, as lowercase hex.
    pub sha256: String,
}

/// The size and SHA-256 the durable data of `seed` must have.
pub fn expected_sum(seed: u64) -> DurableSum {
    let mut hash = Sha256::new();
    let mut bytes = 0;
    for (i, &(_, len)) in durable_extents(seed).iter().enumerate() {
        hash.update(extent_data(seed, i, len));
        bytes += len as u64;
    }
    DurableSum {
        bytes,
        sha256: hex(&hash.finalize()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the durable extents of `seed` to `dev` (even extents O_DIRECT, odd ones
/// through the guest's page cache), fdatasyncs (a FLUSH once the cached ones are
/// written back), calls `flushed` with the data's sum, then writes seeded 4 KiB blocks
/// at and above [`DURABLE_AREA`] without end, a flush every 16, so that requests are in
/// flight whenever the VMM is killed. Returns only on an error.
pub fn write_durable_and_keep_writing(
    dev: &Path,
    seed: u64,
    flushed: impl FnOnce(&DurableSum),
) -> io::Result<()> {
    let direct = open_direct(dev, true)?;
    let cached = OpenOptions::new().read(true).write(true).open(dev)?;
    let len = device_len(&direct)?;
    if len < DURABLE_AREA + (1 << 20) {
        return Err(io::Error::other(format!(
            "the disk ({len} bytes) is smaller than {} MiB",
            (DURABLE_AREA >> 20) + 1
        )));
    }
    let mut buf = AlignedBuf::new(512 << 10);
    let mut hash = Sha256::new();
    let mut bytes = 0;
    for (i, &(offset, n)) in durable_extents(seed).iter().enumerate() {
        let data = extent_data(seed, i, n);
        if i % 2 == 0 {
            buf.slice(n).copy_from_slice(&data);
            direct.write_all_at(buf.slice(n), offset)?;
        } else {
            cached.write_all_at(&data, offset)?;
        }
        hash.update(&data);
        bytes += n as u64;
    }
    cached.sync_data()?;
    flushed(&DurableSum {
        bytes,
        sha256: hex(&hash.finalize()),
    });
    let mut rng = seeded(!seed);
    let blocks = (len - DURABLE_AREA) / 4096;
    for n in 0u64.. {
        for b in buf.slice(4096).iter_mut() {
            *b = rng.next_u64() as u8;
        }
        let at = DURABLE_AREA + rng.range(0, blocks - 1) * 4096;
        direct.write_all_at(buf.slice(4096), at)?;
        if n % 16 == 15 {
            direct.sync_data()?;
        }
    }
    Ok(())
}

/// Host side: what a disk file holds where the durable extents of `seed` were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableCheck {
    /// The file's bytes at the extents: their size and SHA-256.
    pub found: DurableSum,
    /// What they must be.
    pub expected: DurableSum,
    /// Extents whose bytes differ (or lie past the end of the file).
    pub bad_extents: u64,
}

impl DurableCheck {
    /// The one-line form the host-side tests parse.
    pub fn line(&self) -> String {
        format!(
            "EVMM-BLK-HOST-DURABLE bytes={} sha256={} expected_sha256={} bad_extents={}",
            self.found.bytes, self.found.sha256, self.expected.sha256, self.bad_extents
        )
    }
}

/// Host side: reads the durable extents of `seed` from `file` and compares them with
/// what [`write_durable_and_keep_writing`] wrote.
pub fn check_durable_file(file: &Path, seed: u64) -> io::Result<DurableCheck> {
    let f = File::open(file)?;
    let mut hash = Sha256::new();
    let mut bytes = 0;
    let mut bad_extents = 0;
    for (i, &(offset, n)) in durable_extents(seed).iter().enumerate() {
        let mut data = vec![0u8; n];
        let got = read_up_to(&f, &mut data, offset)?;
        if got < n || data != extent_data(seed, i, n) {
            bad_extents += 1;
        }
        hash.update(&data[..got]);
        bytes += got as u64;
    }
    Ok(DurableCheck {
        found: DurableSum {
            bytes,
            sha256: hex(&hash.finalize()),
        },
        expected: expected_sum(seed),
        bad_extents,
    })
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns the bytes read.
fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Size of each write of [`probe_failing_disk`].
pub const PROBE_LEN: usize = 64 << 10;

/// How many flushes [`probe_failing_disk`] makes after the first failed one.
pub const LATER_FLUSHES: usize = 3;

/// What each step of [`probe_failing_disk`] returned: the errno, 0 for success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultProbe {
    /// O_DIRECT write to the good range.
    pub write_good: i32,
    /// fdatasync after it.
    pub flush_good: i32,
    /// O_DIRECT write to the failing range.
    pub write_bad: i32,
    /// fdatasync after it.
    pub flush_after_bad: i32,
    /// Further fdatasyncs, nothing written in between.
    pub flush_later: Vec<i32>,
    /// A second O_DIRECT write to the good range (elsewhere in it).
    pub write_good_again: i32,
    /// fdatasync after it.
    pub flush_after_good: i32,
    /// O_DIRECT read of both good-range writes.
    pub read_good: i32,
    /// Bytes of that read that differ from what was written.
    pub read_bad_bytes: u64,
}

impl FaultProbe {
    /// The one-line form the host-side tests parse, for device `dev`.
    pub fn line(&self, dev: &str) -> String {
        let later: Vec<String> = self.flush_later.iter().map(i32::to_string).collect();
        format!(
            "EVMM-BLK-FAULT-PROBE dev={dev} write_good={} flush_good={} write_bad={} \
             flush_after_bad={} flush_later={} write_good_again={} flush_after_good={} \
             read_good={} read_bad_bytes={}",
            self.write_good,
            self.flush_good,
            self.write_bad,
            self.flush_after_bad,
            later.join(":"),
            self.write_good_again,
            self.flush_after_good,
            self.read_good,
            self.read_bad_bytes
        )
    }
}

fn errno(r: io::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// On a disk whose range at `bad` fails and whose range at `good` works (each at least
/// 2 MiB): writes the good range and flushes, writes the failing range and flushes,
/// flushes [`LATER_FLUSHES`] more times, writes the good range again and flushes, and
/// reads both good writes back. All I/O is O_DIRECT; every step runs whatever the
/// earlier ones returned. Fails only when the device cannot be opened.
pub fn probe_failing_disk(dev: &Path, good: u64, bad: u64) -> io::Result<FaultProbe> {
    let f = open_direct(dev, true)?;
    let mut buf = AlignedBuf::new(PROBE_LEN);
    let mut write = |offset: u64, seed: u8| {
        buf.slice(PROBE_LEN)
            .copy_from_slice(&crate::blk::pattern(offset, PROBE_LEN, seed));
        f.write_all_at(buf.slice(PROBE_LEN), offset)
    };
    let again = good + (1 << 20);
    let write_good = errno(write(good, 0x5a));
    let flush_good = errno(f.sync_data());
    let write_bad = errno(write(bad, 0x6b));
    let flush_after_bad = errno(f.sync_data());
    let flush_later = (0..LATER_FLUSHES).map(|_| errno(f.sync_data())).collect();
    let write_good_again = errno(write(again, 0x7c));
    let flush_after_good = errno(f.sync_data());
    let mut read_bad_bytes = 0;
    let mut read_good = 0;
    for (offset, seed) in [(good, 0x5a), (again, 0x7c)] {
        match f.read_exact_at(buf.slice(PROBE_LEN), offset) {
            Ok(()) => {
                let expected = crate::blk::pattern(offset, PROBE_LEN, seed);
                read_bad_bytes += buf
                    .slice(PROBE_LEN)
                    .iter()
                    .zip(&expected)
                    .filter(|(a, b)| a != b)
                    .count() as u64;
            }
            Err(e) => read_good = e.raw_os_error().unwrap_or(-1),
        }
    }
    Ok(FaultProbe {
        write_good,
        flush_good,
        write_bad,
        flush_after_bad,
        flush_later,
        write_good_again,
        flush_after_good,
        read_good,
        read_bad_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_stay_in_their_slots_a_page_apart() {
        for seed in [0, 1, 7, u64::MAX] {
            let extents = durable_extents(seed);
            assert_eq!(extents.len() as u64, EXTENTS);
            for (i, &(offset, len)) in extents.iter().enumerate() {
                let slot = i as u64 * SLOT;
                assert_eq!(offset % SECTOR, 0);
                assert!((64 << 10..=512 << 10).contains(&len), "{len}");
                assert!(offset >= slot + 4096, "extent {i} of seed {seed}");
                assert!(offset + len as u64 + 4096 <= slot + SLOT);
            }
        }
        assert_ne!(durable_extents(1), durable_extents(2));
    }

    #[test]
    fn the_file_check_finds_each_damaged_or_missing_extent() {
        let seed = 11;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        for (i, &(offset, len)) in durable_extents(seed).iter().enumerate() {
            f.write_all_at(&extent_data(seed, i, len), offset).unwrap();
        }
        // Data elsewhere does not matter.
        f.write_all_at(&[0xff; 4096], DURABLE_AREA).unwrap();
        let good = check_durable_file(&path, seed).unwrap();
        assert_eq!(good.bad_extents, 0);
        assert_eq!(good.found, good.expected);
        assert_eq!(good.expected, expected_sum(seed));
        // Another seed's data is not this seed's.
        assert_eq!(
            check_durable_file(&path, seed + 1).unwrap().bad_extents,
            EXTENTS
        );
        // One flipped byte in extent 3.
        let (offset, len) = durable_extents(seed)[3];
        f.write_all_at(&[!extent_data(seed, 3, len)[100]], offset + 100)
            .unwrap();
        let damaged = check_durable_file(&path, seed).unwrap();
        assert_eq!(damaged.bad_extents, 1);
        assert_ne!(damaged.found.sha256, damaged.expected.sha256);
        // A file cut inside extent 5: it and every later one are missing.
        f.set_len(durable_extents(seed)[5].0 + 10).unwrap();
        assert_eq!(
            check_durable_file(&path, seed).unwrap().bad_extents,
            1 + (EXTENTS - 5)
        );
    }

    #[test]
    fn neighbouring_seeds_and_indices_give_different_data() {
        for seed in 1500..1510 {
            assert_ne!(durable_extents(seed), durable_extents(seed + 1), "{seed}");
            for i in 0..EXTENTS as usize {
                assert_ne!(extent_data(seed, i, 64), extent_data(seed, i + 1, 64));
                assert_ne!(extent_data(seed, i, 64), extent_data(seed + 1, i, 64));
            }
        }
    }

    #[test]
    fn extent_data_depends_on_seed_and_index() {
        assert_eq!(extent_data(3, 1, 100), extent_data(3, 1, 100));
        assert_ne!(extent_data(3, 1, 100), extent_data(3, 2, 100));
        assert_ne!(extent_data(3, 1, 100), extent_data(4, 1, 100));
        assert_eq!(extent_data(3, 1, 100).len(), 100);
    }

    #[test]
    fn the_probe_on_a_working_file_reports_success_everywhere() {
        // O_DIRECT is refused on tmpfs, which /tmp may be: the file goes next to the
        // sources, on the file system that holds the checkout.
        let f = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        f.as_file().set_len(8 << 20).unwrap();
        match probe_failing_disk(f.path(), 0, 4 << 20) {
            Ok(p) => {
                assert_eq!(p.write_good, 0);
                assert_eq!(p.write_bad, 0);
                assert_eq!(p.flush_later, vec![0; LATER_FLUSHES]);
                assert_eq!(p.read_good, 0);
                assert_eq!(p.read_bad_bytes, 0);
                assert!(p.line("x").contains("flush_later=0:0:0"), "{}", p.line("x"));
            }
            Err(e) => panic!(
                "cannot open a temporary file O_DIRECT ({e}): TMPDIR must be on a file system with O_DIRECT"
            ),
        }
    }
}
