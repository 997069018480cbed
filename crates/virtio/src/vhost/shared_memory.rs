//! Guest memory shared with a process on the other side of a vhost-user socket.
//!
//! Both sides map the same file. If either side could change the file's size, the
//! other's next access past the new end would raise SIGBUS: a backend that truncates
//! guest RAM would bring the VMM down, and a frontend that hands over a file shorter
//! than the region it describes would bring the backend down. So the VMM seals its
//! guest RAM memfd against resizing ([`seal_size`]), and a backend accepts a region
//! only from a file that is large enough and sealed against shrinking
//! ([`check_region_file`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The seals on guest RAM: its size is fixed for good (no shrinking, no growing) and
/// nobody can lift or add seals afterwards.
pub const SIZE_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Why a shared region is refused.
#[derive(Debug, thiserror::Error)]
pub enum SharedRegionError {
    /// `fstat` or `F_GET_SEALS` failed on the region's file.
    #[error("cannot inspect the region's file: {0}")]
    Inspect(#[source] io::Error),
    /// The region ends past the end of its file.
    #[error(
        "the region (offset {offset:#x}, {size:#x} bytes) ends past the end of its file \
         ({file_size:#x} bytes)"
    )]
    PastEnd {
        /// Offset of the region in the file.
        offset: u64,
        /// Size of the region.
        size: u64,
        /// Size of the file.
        file_size: u64,
    },
    /// The file may shrink under the mapping.
    #[error(
        "the region's file is not sealed against shrinking (seals {seals:#x}); share guest \
         memory as a sealed memfd (QEMU: memory-backend-memfd, whose seal=on is the default)"
    )]
    NotSealed {
        /// The file's seals (`F_GET_SEALS`; 0 for a file that cannot be sealed).
        seals: libc::c_int,
    },
}

/// Seals `file` (a memfd created with `MFD_ALLOW_SEALING`) with [`SIZE_SEALS`].
pub fn seal_size(file: &File) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS on a valid descriptor; the call reads no memory of ours.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SIZE_SEALS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that `size` bytes at `offset` of `file` can be mapped and used for as long as
/// the mapping lives: the file holds them and is sealed against shrinking.
pub fn check_region_file(file: &File, offset: u64, size: u64) -> Result<(), SharedRegionError> {
    let file_size = file.metadata().map_err(SharedRegionError::Inspect)?.len();
    if offset.checked_add(size).is_none_or(|end| end > file_size) {
        return Err(SharedRegionError::PastEnd {
            offset,
            size,
            file_size,
        });
    }
    // SAFETY: F_GET_SEALS on a valid descriptor; the call reads no memory of ours.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        // EINVAL: a file that does not support sealing (not a memfd, not shmem).
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(SharedRegionError::Inspect(e));
        }
        return Err(SharedRegionError::NotSealed { seals: 0 });
    }
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(SharedRegionError::NotSealed { seals });
    }
    Ok(())
}

/// Checks every region of `memory` as mapped from a frontend's memory table with
/// [`check_region_file`]; a region without a file is refused too.
pub fn check_memory_table(
    memory: &vm_memory::GuestMemoryMmap,
) -> Result<(), (vm_memory::GuestAddress, SharedRegionError)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in memory.iter() {
        let checked = match region.file_offset() {
            Some(fo) => check_region_file(fo.file(), fo.start(), region.len()),
            None => Err(SharedRegionError::NotSealed { seals: 0 }),
        };
        checked.map_err(|e| (region.start_addr(), e))?;
    }
    Ok(())
}

/// A new memfd of `size` bytes, sealed with [`SIZE_SEALS`], named `name`.
pub fn sealed_memfd(name: &std::ffi::CStr, size: u64) -> io::Result<File> {
    // SAFETY: `name` is NUL-terminated and the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size)?;
    seal_size(&file)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsealed_memfd(size: u64) -> File {
        // SAFETY: the name is NUL-terminated; the result is checked.
        let fd = unsafe {
            libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: a new descriptor owned by nobody else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn a_sealed_memfd_cannot_change_size_and_passes_the_check() {
        let f = sealed_memfd(c"t", 1 << 20).unwrap();
        let peer = f.try_clone().unwrap();
        for len in [0, 4096, 2 << 20] {
            let e = peer.set_len(len).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "set_len({len})");
        }
        // The seals are sealed too.
        // SAFETY: F_ADD_SEALS on a descriptor this test owns.
        let added = unsafe { libc::fcntl(peer.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(added, -1);
        check_region_file(&f, 0, 1 << 20).unwrap();
        check_region_file(&f, 4096, (1 << 20) - 4096).unwrap();
    }

    #[test]
    fn a_memory_table_passes_only_if_every_region_does() {
        use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
        let good = sealed_memfd(c"t", 1 << 20).unwrap();
        let short = sealed_memfd(c"t", 1 << 16).unwrap();
        let ok = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            1 << 20,
            Some(FileOffset::new(good.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        check_memory_table(&ok).unwrap();
        // The second region maps a file shorter than itself (mmap allows that; the
        // first access past the file's end would raise SIGBUS).
        let bad = GuestMemoryMmap::<()>::from_ranges_with_files(&[
            (GuestAddress(0), 1 << 20, Some(FileOffset::new(good, 0))),
            (
                GuestAddress(1 << 30),
                1 << 20,
                Some(FileOffset::new(short, 0)),
            ),
        ])
        .unwrap();
        let (at, e) = check_memory_table(&bad).unwrap_err();
        assert_eq!(at, GuestAddress(1 << 30));
        assert!(
            matches!(
                e,
                SharedRegionError::PastEnd {
                    file_size: 65536,
                    ..
                }
            ),
            "{e}"
        );
        let anonymous = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        assert!(check_memory_table(&anonymous).is_err());
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let f = sealed_memfd(c"t", 1 << 20).unwrap();
        for (offset, size) in [
            (0, (1 << 20) + 1),
            (4096, 1 << 20),
            (u64::MAX, 2),
            (1 << 21, 0),
        ] {
            assert!(
                matches!(
                    check_region_file(&f, offset, size),
                    Err(SharedRegionError::PastEnd { .. })
                ),
                "{offset:#x}+{size:#x}"
            );
        }
    }

    #[test]
    fn a_file_that_may_shrink_is_refused() {
        let f = unsealed_memfd(1 << 20);
        assert!(matches!(
            check_region_file(&f, 0, 1 << 20),
            Err(SharedRegionError::NotSealed { seals: 0 })
        ));
        // Grow-sealed only: still may shrink.
        // SAFETY: F_ADD_SEALS on a descriptor this test owns.
        let added = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_GROW) };
        assert_eq!(added, 0);
        assert!(matches!(
            check_region_file(&f, 0, 1 << 20),
            Err(SharedRegionError::NotSealed { .. })
        ));
        // A regular file cannot be sealed at all.
        let tmp = tempfile::tempfile().unwrap();
        tmp.set_len(1 << 20).unwrap();
        assert!(matches!(
            check_region_file(&tmp, 0, 1 << 20),
            Err(SharedRegionError::NotSealed { seals: 0 })
        ));
    }
}
