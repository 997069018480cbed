//! Loading the kernel image and the initramfs into guest memory.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{setup_header, XLF_KERNEL_64};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::arch::layout::HIMEM_START;
use crate::vstate::memory::{low_ram_end, GuestMemoryMmap};

/// Offset of the 64-bit entry point from the start of the protected-mode
/// kernel of a bzImage (`startup_64`).
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Alignment of the initramfs.
const INITRAMFS_ALIGN: u64 = 0x1000;

/// Errors while loading the kernel or the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Neither a bzImage nor an ELF file.
    #[error("{0} is not a kernel image (neither a bzImage nor an ELF vmlinux)")]
    NotAKernel(PathBuf),
    /// A bzImage without the 64-bit entry point.
    #[error("{0} is a bzImage without a 64-bit entry point (only x86-64 kernels are supported)")]
    Not64Bit(PathBuf),
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {source}")]
    Loader {
        /// The kernel path.
        path: PathBuf,
        /// Underlying error.
        source: linux_loader::loader::Error,
    },
    /// The kernel needs more memory than the guest has below the MMIO hole.
    #[error("guest memory is too small for kernel {path}: it needs {needed_mib} MiB below 3 GiB")]
    KernelTooLarge {
        /// The kernel path.
        path: PathBuf,
        /// Memory needed in MiB.
        needed_mib: u64,
    },
    /// The initramfs is empty.
    #[error("initramfs {0} is empty")]
    EmptyInitramfs(PathBuf),
    /// No room for the initramfs between the kernel and the top of low RAM.
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory \
         ({available} bytes free above the kernel); give the guest more --memory"
    )]
    InitramfsTooLarge {
        /// The initramfs path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room available.
        available: u64,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelEntry {
    /// The Linux 64-bit boot protocol: long mode, RSI = zero page.
    /// `setup_header` is the bzImage's header (None for an ELF vmlinux).
    Linux64 {
        /// Entry address.
        entry: GuestAddress,
        /// Setup header of a bzImage.
        setup_header: Option<setup_header>,
    },
    /// The PVH boot protocol: 32-bit protected mode, EBX = hvm_start_info.
    Pvh {
        /// Entry address from the XEN_ELFNOTE_PHYS32_ENTRY note.
        entry: GuestAddress,
    },
}

/// A kernel loaded into guest memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadedKernel {
    /// How to enter it.
    pub entry: KernelEntry,
    /// First guest address above everything the kernel needs at boot.
    pub end: u64,
}

/// An initramfs loaded into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitramfs {
    /// Guest address of the first byte.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Kernel image formats evmm recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// bzImage ("HdrS" at 0x202).
    BzImage,
    /// ELF file.
    Elf,
}

/// Recognises the kernel format from the first bytes of the image.
pub fn detect_format(header: &[u8]) -> Option<KernelFormat> {
    if header.len() >= 4 && &header[..4] == b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if header.len() >= 0x206 && &header[0x202..0x206] == b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LoadError + 'a {
    move |source| LoadError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Loads the kernel at `path` into `mem` and says how to enter it.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoadError> {
    let mut file = File::open(path).map_err(io_err("kernel", path))?;
    if file.metadata().map_err(io_err("kernel", path))?.is_dir() {
        return Err(LoadError::Io {
            what: "kernel",
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::EISDIR),
        });
    }
    let mut header = Vec::with_capacity(0x206);
    (&mut file)
        .take(0x206)
        .read_to_end(&mut header)
        .map_err(io_err("kernel", path))?;
    file.seek(SeekFrom::Start(0))
        .map_err(io_err("kernel", path))?;
    let format = detect_format(&header).ok_or_else(|| LoadError::NotAKernel(path.into()))?;
    let loader_err = |source| LoadError::Loader {
        path: path.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let low_end = low_ram_end(mem_size(mem));

    let loaded = match format {
        KernelFormat::BzImage => {
            let res = BzImage::load(mem, None, &mut file, himem).map_err(loader_err)?;
            let hdr = res
                .setup_header
                .ok_or_else(|| LoadError::NotAKernel(path.into()))?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoadError::Not64Bit(path.into()));
            }
            // The decompressor needs init_size bytes from the load address.
            let init_end = res.kernel_load.raw_value() + u64::from(hdr.init_size);
            let end = res.kernel_end.max(init_end);
            LoadedKernel {
                entry: KernelEntry::Linux64 {
                    entry: res.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                    setup_header: Some(hdr),
                },
                end,
            }
        }
        KernelFormat::Elf => {
            let res = Elf::load(mem, None, &mut file, himem).map_err(loader_err)?;
            let entry = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => KernelEntry::Pvh { entry },
                _ => KernelEntry::Linux64 {
                    entry: res.kernel_load,
                    setup_header: None,
                },
            };
            LoadedKernel {
                entry,
                end: res.kernel_end,
            }
        }
    };
    if loaded.end > low_end {
        return Err(LoadError::KernelTooLarge {
            path: path.into(),
            needed_mib: loaded.end.div_ceil(1 << 20),
        });
    }
    let (protocol, entry) = match loaded.entry {
        KernelEntry::Linux64 { entry, .. } => ("64-bit boot protocol", entry),
        KernelEntry::Pvh { entry } => ("PVH", entry),
    };
    log::info!(
        "loaded {format:?} kernel {}: {protocol} entry {:#x}, needs memory up to {:#x}",
        path.display(),
        entry.0,
        loaded.end
    );
    Ok(loaded)
}

fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

/// Where an initramfs of `size` bytes goes: as high as possible below
/// `top` (exclusive), page aligned, and not below `floor`.
pub fn initramfs_placement(size: u64, floor: u64, top: u64) -> Option<u64> {
    let start = top.checked_sub(size)? & !(INITRAMFS_ALIGN - 1);
    (start >= floor).then_some(start)
}

/// Loads the initramfs at `path` high in low RAM, above `kernel_end` and
/// below `max_addr` (the kernel's `initrd_addr_max` + 1).
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    max_addr: u64,
) -> Result<LoadedInitramfs, LoadError> {
    let mut file = File::open(path).map_err(io_err("initramfs", path))?;
    let meta = file.metadata().map_err(io_err("initramfs", path))?;
    if meta.is_dir() {
        return Err(LoadError::Io {
            what: "initramfs",
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::EISDIR),
        });
    }
    let size = meta.len();
    if size == 0 {
        return Err(LoadError::EmptyInitramfs(path.into()));
    }
    let top = low_ram_end(mem_size(mem)).min(max_addr);
    let floor = kernel_end.next_multiple_of(INITRAMFS_ALIGN);
    let addr = initramfs_placement(size, floor, top).ok_or(LoadError::InitramfsTooLarge {
        path: path.into(),
        size,
        available: top.saturating_sub(floor),
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| LoadError::Io {
            what: "initramfs",
            path: path.into(),
            source: io::Error::other(e.to_string()),
        })?;
    log::info!(
        "loaded initramfs {} ({size} bytes) at {addr:#x}",
        path.display()
    );
    Ok(LoadedInitramfs {
        addr: GuestAddress(addr),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;
    use std::io::Write;

    #[test]
    fn detects_formats() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn initramfs_goes_high_and_aligned() {
        assert_eq!(
            initramfs_placement(0x1800, 0x100000, 0x2000000),
            Some(0x1ffe000)
        );
        assert_eq!(
            initramfs_placement(0x1000, 0x100000, 0x2000000),
            Some(0x1fff000)
        );
        // Does not fit above the floor.
        assert_eq!(initramfs_placement(0x2000000, 0x100000, 0x2000000), None);
        assert_eq!(initramfs_placement(u64::MAX, 0, 0x1000), None);
    }

    #[test]
    fn rejects_files_that_are_no_kernel() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"this is not a kernel, just some text\n")
            .unwrap();
        let err = load_kernel(ram.memory(), f.path()).unwrap_err();
        assert!(matches!(err, LoadError::NotAKernel(_)), "{err}");
        let err = load_kernel(ram.memory(), Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot read kernel /nonexistent/vmlinuz"));
        let err = load_kernel(ram.memory(), Path::new("/")).unwrap_err();
        assert!(matches!(err, LoadError::Io { .. }), "{err}");
    }

    #[test]
    fn truncated_bzimage_is_an_error_not_a_panic() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&img).unwrap();
        assert!(load_kernel(ram.memory(), f.path()).is_err());
    }

    #[test]
    fn initramfs_too_large() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(15 << 20).unwrap();
        let err = load_initramfs(ram.memory(), f.path(), 2 << 20, u64::MAX).unwrap_err();
        assert!(matches!(err, LoadError::InitramfsTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("does not fit"));
    }

    #[test]
    fn initramfs_is_loaded() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"070701initramfs").unwrap();
        let loaded = load_initramfs(ram.memory(), f.path(), 2 << 20, u64::MAX).unwrap();
        assert_eq!(loaded.size, 15);
        assert_eq!(loaded.addr.raw_value(), (16 << 20) - 0x1000);
        let mut buf = [0u8; 6];
        ram.memory().read_slice(&mut buf, loaded.addr).unwrap();
        assert_eq!(&buf, b"070701");
    }
}
