//! Guest buffers as `iovec`s, and positioned vector I/O on them: the disk's data goes
//! straight between the file and guest memory, without a copy in between.

use super::super::request::Segment;
use std::io;
use std::os::unix::io::AsRawFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

/// Most iovecs one preadv/pwritev takes (IOV_MAX on Linux).
const IOV_MAX: usize = 1024;

/// An `iovec` list that may be handed to the kernel from another thread (an io_uring
/// worker); its pointers point into guest memory, which whoever holds the list keeps
/// mapped.
#[derive(Default)]
pub struct IoVecs(Vec<libc::iovec>);

// SAFETY: the iovecs are plain addresses into guest memory, which is shared with the
// guest and every thread of the VMM anyway; the list is only read through `&self`.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// An empty list with room for `n` entries (so that filling it later allocates
    /// nothing while a request has at most that many pieces).
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// Replaces the list with the host addresses of `segments` in `mem` (a segment that
    /// spans two memory regions becomes two entries). Returns the total length. Fails
    /// when a segment is not wholly in guest memory.
    pub fn fill(&mut self, mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<u64> {
        self.0.clear();
        let mut total = 0u64;
        for s in segments.iter().filter(|s| s.len > 0) {
            for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
                let slice = slice.map_err(io::Error::other)?;
                self.0.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
                total += slice.len() as u64;
            }
        }
        Ok(total)
    }

    /// The entries.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.0
    }

    /// Drops the first `n` bytes (after a transfer of that many).
    pub fn advance(&mut self, mut n: usize) {
        let whole = self
            .0
            .iter()
            .take_while(|v| {
                if n >= v.iov_len {
                    n -= v.iov_len;
                    true
                } else {
                    false
                }
            })
            .count();
        self.0.drain(..whole);
        if let Some(first) = self.0.first_mut() {
            // n < first.iov_len here.
            first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
            first.iov_len -= n;
        }
    }

    /// Whether every address is aligned to `align` bytes and every length a multiple of
    /// it (what O_DIRECT asks of a transfer).
    pub fn aligned_to(&self, align: usize) -> bool {
        self.0
            .iter()
            .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(align))
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|v| v.iov_len as u64).sum()
    }

    /// Whether there is nothing to transfer.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|v| v.iov_len == 0)
    }
}

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the file into the buffers.
    Read,
    /// From the buffers into the file.
    Write,
}

/// Moves all of `iov` between `file` at `offset` and guest memory (preadv/pwritev, as
/// many calls as it takes). `iov` is consumed (advanced) as it goes. A read that meets
/// the end of the file fails with UnexpectedEof.
pub fn transfer_all(
    file: &impl AsRawFd,
    dir: Direction,
    iov: &mut IoVecs,
    mut offset: u64,
) -> io::Result<()> {
    while !iov.is_empty() {
        let list = iov.as_slice();
        let count = list.len().min(IOV_MAX) as libc::c_int;
        let at = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: every iovec points into guest memory that the caller keeps mapped for
        // the call (a `GuestMemoryMmap` it borrows or holds); the kernel checks the
        // ranges and fails with EFAULT rather than touching anything else.
        let n = unsafe {
            match dir {
                Direction::Read => libc::preadv(file.as_raw_fd(), list.as_ptr(), count, at),
                Direction::Write => libc::pwritev(file.as_raw_fd(), list.as_ptr(), count, at),
            }
        };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the disk file ended before the request did",
                ))
            }
            n => {
                let n = n as usize;
                iov.advance(n);
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn segments_across_two_regions_become_two_iovecs() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let mut iov = IoVecs::default();
        let total = iov
            .fill(
                &mem,
                &[Segment {
                    addr: GuestAddress(0xe00),
                    len: 0x400,
                }],
            )
            .unwrap();
        assert_eq!(total, 0x400);
        assert_eq!(iov.as_slice().len(), 2);
        assert_eq!(iov.as_slice()[0].iov_len, 0x200);
        assert!(iov
            .fill(
                &mem,
                &[Segment {
                    addr: GuestAddress(0x1f00),
                    len: 0x200,
                }],
            )
            .is_err());
    }

    #[test]
    fn advancing_drops_whole_and_partial_entries() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut iov = IoVecs::default();
        let segs = [
            Segment {
                addr: GuestAddress(0),
                len: 512,
            },
            Segment {
                addr: GuestAddress(0x1000),
                len: 1024,
            },
        ];
        iov.fill(&mem, &segs).unwrap();
        iov.advance(512 + 100);
        assert_eq!(iov.as_slice().len(), 1);
        assert_eq!(iov.len(), 924);
        iov.advance(924);
        assert!(iov.is_empty());
    }

    #[test]
    fn reads_and_writes_go_straight_to_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let file = tempfile::tempfile().unwrap();
        mem.write_slice(&[7u8; 1536], GuestAddress(0x2000)).unwrap();
        let segs = [
            Segment {
                addr: GuestAddress(0x2000),
                len: 512,
            },
            Segment {
                addr: GuestAddress(0x2200),
                len: 1024,
            },
        ];
        let mut iov = IoVecs::default();
        iov.fill(&mem, &segs).unwrap();
        transfer_all(&file, Direction::Write, &mut iov, 512).unwrap();
        iov.fill(
            &mem,
            &[Segment {
                addr: GuestAddress(0x8000),
                len: 2048,
            }],
        )
        .unwrap();
        transfer_all(&file, Direction::Read, &mut iov, 0).unwrap();
        let mut back = [0u8; 2048];
        mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0));
        assert!(back[512..].iter().all(|&b| b == 7));
        // Beyond the end of the file.
        iov.fill(&mem, &segs).unwrap();
        let e = transfer_all(&file, Direction::Read, &mut iov, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
