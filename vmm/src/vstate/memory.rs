//! Guest RAM: one memfd mapped into the guest's physical address space,
//! split around the 32-bit MMIO hole, and the e820 map that describes it.
//!
//! The memfd makes the RAM shareable: a vhost-user backend can later map the
//! same pages from the file descriptor and offsets of the regions.

use std::fs::File;
use std::io;
use std::sync::Arc;

use evmm_virtio::vhost::shared_memory::sealed_memfd;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::arch::layout::{
    ACPI_START, BIOS_END, EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START, MMIO_HOLE_START,
};

/// The guest memory type used throughout evmm.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Creating, sizing or sealing the memfd failed.
    #[error("cannot create the sealed memfd for guest RAM: {0}")]
    Memfd(#[source] io::Error),
    /// Mapping a region failed.
    #[error("cannot map guest RAM: {0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
    /// Regions overlap or are otherwise inconsistent.
    #[error("cannot assemble guest RAM regions: {0}")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
}

/// Type of an e820 entry, with the values Linux uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (firmware tables, legacy holes).
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Kind of memory.
    pub kind: E820Type,
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    memfd: Arc<File>,
    size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM backed by a fresh memfd, laid out
    /// by [`ram_ranges`].
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let memfd = Arc::new(create_memfd(size)?);
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (start, len) in ram_ranges(size) {
            let region = GuestRegionMmap::from_range(
                start,
                len as usize,
                Some(FileOffset::from_arc(memfd.clone(), file_offset)),
            )?;
            regions.push(region);
            file_offset += len;
        }
        let memory = GuestMemoryMmap::from_regions(regions)?;
        log::debug!("guest RAM: {size:#x} bytes in {:?}", ram_ranges(size));
        Ok(GuestRam {
            memory,
            memfd,
            size,
        })
    }

    /// The guest memory map.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memfd that backs all regions (region i starts at the sum of the
    /// lengths of regions before it).
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

fn create_memfd(size: u64) -> Result<File, MemoryError> {
    // Sealed against resizing: a vhost-user backend that receives the fd cannot pull
    // guest RAM out from under evmm's mappings.
    sealed_memfd(c"evmm-guest-ram", size).map_err(MemoryError::Memfd)
}

/// Splits `size` bytes of RAM into guest-physical ranges: everything below
/// the MMIO hole first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(FIRST_ADDR_PAST_32BITS), size - MMIO_HOLE_START),
        ]
    }
}

/// Highest address + 1 of RAM below the MMIO hole.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// The e820 map the guest is given: low RAM up to the EBDA, the reserved
/// firmware area (EBDA, ACPI, MP table), RAM from 1 MiB to the hole, and RAM
/// above 4 GiB. `size` must be larger than 1 MiB.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820Type::Reserved,
        },
        E820Entry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820Type::Reserved,
        },
    ];
    let low_end = low_ram_end(size);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Type::Ram,
        });
    }
    if size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: FIRST_ADDR_PAST_32BITS,
            size: size - MMIO_HOLE_START,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
        assert_eq!(ram_ranges(3 * GIB), vec![(GuestAddress(0), 3 * GIB)]);
    }

    #[test]
    fn large_memory_skips_the_hole() {
        assert_eq!(
            ram_ranges(4 * GIB),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), GIB)]
        );
    }

    #[test]
    fn e820_small() {
        let map = e820_map(512 * MIB);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Type::Ram
            }
        );
        assert_eq!(map[2].addr, 0xe0000);
        assert_eq!(map[2].kind, E820Type::Reserved);
        assert_eq!(
            map[3],
            E820Entry {
                addr: MIB,
                size: 511 * MIB,
                kind: E820Type::Ram
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 512 * MIB - (MIB - 0x9fc00));
    }

    #[test]
    fn e820_large_has_high_ram() {
        let map = e820_map(6 * GIB);
        let last = map.last().unwrap();
        assert_eq!(last.addr, 4 * GIB);
        assert_eq!(last.size, 3 * GIB);
        assert_eq!(map[3].addr + map[3].size, 3 * GIB);
        // No entry overlaps the MMIO hole.
        for e in &map {
            assert!(e.addr + e.size <= 3 * GIB || e.addr >= 4 * GIB);
        }
    }

    #[test]
    fn memfd_backed_memory_is_shared_with_the_fd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(16 * MIB).unwrap();
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory().num_regions(), 1);
        assert!(ram.memory().iter().all(|r| {
            use vm_memory::GuestMemoryRegion;
            r.file_offset().is_some()
        }));
    }

    #[test]
    fn whoever_holds_the_memfd_cannot_resize_guest_ram() {
        use evmm_virtio::vhost::shared_memory::SIZE_SEALS;
        use std::os::fd::AsRawFd;
        let ram = GuestRam::new(16 * MIB).unwrap();
        // What a vhost-user backend receives: a duplicate of the fd.
        let peer = ram.memfd().try_clone().unwrap();
        for len in [0, 4096, 15 * MIB, 32 * MIB] {
            let err = peer.set_len(len).unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EPERM),
                "set_len({len}): {err}"
            );
        }
        // SAFETY: F_GET_SEALS on an fd this test owns.
        let seals = unsafe { libc::fcntl(peer.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & SIZE_SEALS, SIZE_SEALS);
        // SAFETY: F_ADD_SEALS on an fd this test owns; the seals are sealed, so it fails.
        let lift = unsafe { libc::fcntl(peer.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(lift, -1);
        // Guest RAM is still all there.
        ram.memory()
            .write_obj(0x1234_5678u32, GuestAddress(16 * MIB - 4))
            .unwrap();
        assert_eq!(peer.metadata().unwrap().len(), 16 * MIB);
    }
}
