//! The disk image a device serves (shared by every queue and engine of the device) and
//! the result of one executed request.

use super::request::{SECTOR_SHIFT, SECTOR_SIZE};
use super::BlockError;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

/// Length of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// An open disk image, shared by all the queues (and workers) of a device.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    capacity_sectors: u64,
    readonly: bool,
    direct: bool,
    id: [u8; ID_BYTES],
    flush_failed: AtomicBool,
    block_size: u32,
}

impl DiskFile {
    /// Opens `path` (O_RDONLY when `readonly`, O_DIRECT when `direct`). The capacity is
    /// the file size rounded down to whole sectors.
    pub fn open(path: &Path, readonly: bool, direct: bool, id: &str) -> Result<Self, BlockError> {
        let id_bytes = id.as_bytes();
        if id_bytes.len() > ID_BYTES {
            return Err(BlockError::Config(format!(
                "id {id:?} is longer than {ID_BYTES} bytes"
            )));
        }
        let mut id_buf = [0u8; ID_BYTES];
        id_buf
            .get_mut(..id_bytes.len())
            .ok_or_else(|| BlockError::Config("id too long".into()))?
            .copy_from_slice(id_bytes);

        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(!readonly);
        // O_NONBLOCK: opening a FIFO must not wait for a writer; the file is checked and
        // the flag cleared before anything else.
        let mut flags = libc::O_NONBLOCK;
        if direct {
            flags |= libc::O_DIRECT;
        }
        options.custom_flags(flags);
        let mut file = options.open(path).map_err(open_err)?;
        let kind = file.metadata().map_err(open_err)?.file_type();
        if !(kind.is_file() || kind.is_block_device()) {
            return Err(BlockError::NotADisk {
                path: path.to_path_buf(),
            });
        }
        clear_nonblocking(&file).map_err(open_err)?;
        let block_size = logical_block_size(&file, kind.is_block_device(), direct);
        lock(&file, readonly).map_err(|e| match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => BlockError::Locked {
                path: path.to_path_buf(),
                held: if readonly {
                    "for writing"
                } else {
                    "read-only or for writing"
                },
            },
            _ => open_err(e),
        })?;
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk {}: size {size} is not a multiple of {SECTOR_SIZE}; the tail is not visible",
                path.display()
            );
        }
        Ok(Self {
            file,
            capacity_sectors: size >> SECTOR_SHIFT,
            readonly,
            direct,
            id: id_buf,
            flush_failed: AtomicBool::new(false),
            block_size,
        })
    }

    /// A disk on an already open `file`, unchecked and unlocked: for tests that need a
    /// file the checks of [`DiskFile::open`] would refuse (a device whose fdatasync fails).
    #[cfg(test)]
    pub(crate) fn on_file(file: File) -> Self {
        Self {
            file,
            capacity_sectors: 0,
            readonly: false,
            direct: false,
            id: [0; ID_BYTES],
            flush_failed: AtomicBool::new(false),
            block_size: SECTOR_SIZE as u32,
        }
    }

    /// The smallest unit the disk can be read and written in, in bytes: the device's
    /// logical block size (a block device), the file system's O_DIRECT alignment (a
    /// file opened O_DIRECT), else 512. The device offers it as `blk_size`, so the
    /// guest issues whole, aligned blocks; O_DIRECT on 4 KiB-sector storage needs that.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether the file was opened O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// What GET_ID answers.
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Makes every write so far durable (fdatasync), as a FLUSH request does; for
    /// hosts that stop or hand the disk over. Fails for good once any flush of this disk
    /// failed ([`DiskFile::note_flush_failed`]).
    pub fn sync_data(&self) -> io::Result<()> {
        if self.flush_failed() {
            return Err(io::Error::other(
                "an earlier flush of this disk failed: writes may have been lost",
            ));
        }
        self.file
            .sync_data()
            .inspect_err(|_| self.note_flush_failed())
    }

    /// Records that an fdatasync of the disk failed. After that the kernel may have
    /// dropped dirty pages it could not write, so a later fdatasync that succeeds
    /// proves nothing about them: every later flush fails.
    pub fn note_flush_failed(&self) {
        if !self.flush_failed.swap(true, Ordering::AcqRel) {
            log::error!(
                "a flush of the disk failed: every later FLUSH is answered with an I/O error"
            );
        }
    }

    /// Whether a flush of this disk failed.
    pub fn flush_failed(&self) -> bool {
        self.flush_failed.load(Ordering::Acquire)
    }
}

/// See [`DiskFile::block_size`]. Anything odd (not a power of two between 512 and
/// 64 KiB, or a query the kernel refuses) counts as 512.
fn logical_block_size(file: &File, block_device: bool, direct: bool) -> u32 {
    const BLKSSZGET: libc::c_ulong = 0x1268;
    let mut size: u32 = SECTOR_SIZE as u32;
    if block_device {
        let mut v: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int to the pointer, which is valid for it.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut v) } == 0 {
            size = u32::try_from(v).unwrap_or(0);
        }
    } else if direct {
        // SAFETY: statx is plain data; zeroes are a valid value.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: an empty path with AT_EMPTY_PATH names the descriptor itself; `stx` is
        // valid for writes of a statx struct.
        let r = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                STATX_DIOALIGN,
                &mut stx,
            )
        };
        if r == 0 && stx.stx_mask & STATX_DIOALIGN != 0 {
            size = stx.stx_dio_offset_align;
        }
    }
    if size.is_power_of_two() && (512..=65536).contains(&size) {
        size
    } else {
        SECTOR_SIZE as u32
    }
}

/// statx's mask bit for the O_DIRECT alignment fields (Linux 6.1).
const STATX_DIOALIGN: u32 = 0x2000;

fn clear_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a valid descriptor; no memory is passed.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Takes an open file description lock on the whole file: exclusive for a disk opened
/// for writing, shared for a read-only one, so that two guests cannot write one image
/// and nobody writes an image a guest reads. The lock goes with the file's last
/// descriptor.
fn lock(file: &File, readonly: bool) -> io::Result<()> {
    let lock = libc::flock {
        l_type: if readonly {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads the flock struct, which outlives the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The result of executing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The status byte (VIRTIO_BLK_S_*).
    pub status: u8,
    /// Bytes written into the guest's buffers, not counting the status byte.
    pub written_to_guest: u32,
    /// Bytes read from the disk.
    pub bytes_read: u64,
    /// Bytes written to the disk.
    pub bytes_written: u64,
}

impl Completion {
    /// Success, nothing moved.
    pub fn ok() -> Self {
        Self {
            status: VIRTIO_BLK_S_OK as u8,
            written_to_guest: 0,
            bytes_read: 0,
            bytes_written: 0,
        }
    }

    /// VIRTIO_BLK_S_IOERR, nothing moved.
    pub fn ioerr() -> Self {
        Self {
            status: VIRTIO_BLK_S_IOERR as u8,
            ..Self::ok()
        }
    }

    /// A read of `len` bytes into the guest.
    pub fn read(len: u64) -> Self {
        Self {
            written_to_guest: u32::try_from(len).unwrap_or(u32::MAX),
            bytes_read: len,
            ..Self::ok()
        }
    }

    /// A write of `len` bytes from the guest.
    pub fn written(len: u64) -> Self {
        Self {
            bytes_written: len,
            ..Self::ok()
        }
    }

    /// The used length for the used ring: the guest-written data plus the status byte.
    pub fn used_len(&self) -> u32 {
        self.written_to_guest.saturating_add(1)
    }
}

#[cfg(test)]
mod open_tests {
    use super::*;

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f
    }

    #[test]
    fn a_disk_open_for_writing_is_locked_against_every_other_open() {
        let f = image();
        let first = DiskFile::open(f.path(), false, false, "").unwrap();
        for readonly in [false, true] {
            let e = DiskFile::open(f.path(), readonly, false, "").unwrap_err();
            assert!(
                matches!(e, BlockError::Locked { .. }),
                "readonly={readonly}: {e}"
            );
            assert!(e.to_string().contains("in use"), "{e}");
        }
        drop(first);
        DiskFile::open(f.path(), false, false, "").unwrap();
    }

    #[test]
    fn read_only_opens_share_and_keep_writers_out() {
        let f = image();
        let a = DiskFile::open(f.path(), true, false, "").unwrap();
        let b = DiskFile::open(f.path(), true, false, "").unwrap();
        let e = DiskFile::open(f.path(), false, false, "").unwrap_err();
        assert!(matches!(e, BlockError::Locked { .. }), "{e}");
        drop((a, b));
        DiskFile::open(f.path(), false, false, "").unwrap();
    }

    #[test]
    fn a_fifo_or_a_directory_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo reads nothing else.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Read-only: opening a FIFO for reading would wait for a writer without O_NONBLOCK.
        let e = DiskFile::open(&fifo, true, false, "").unwrap_err();
        assert!(matches!(e, BlockError::NotADisk { .. }), "{e}");
        let e = DiskFile::open(dir.path(), true, false, "").unwrap_err();
        assert!(
            matches!(e, BlockError::NotADisk { .. } | BlockError::Open { .. }),
            "{e}"
        );
    }
}

#[cfg(test)]
mod block_size_tests {
    use super::*;
    use crate::blk::config::{config_space, CONFIG_SIZE};

    #[test]
    fn a_file_has_512_byte_blocks_and_the_config_space_says_what_the_disk_has() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let d = DiskFile::open(f.path(), false, false, "").unwrap();
        assert_eq!(d.block_size(), 512);
        let c: [u8; CONFIG_SIZE] = config_space(2048, 1, 4096);
        assert_eq!(
            u32::from_le_bytes(c[20..24].try_into().unwrap()),
            4096,
            "blk_size"
        );
        // discard_sector_alignment, in 512-byte sectors.
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        let c = config_space(2048, 1, 512);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    }

    /// A loop device with 4 KiB sectors, O_DIRECT: the disk reports 4096. Optional: it
    /// needs root and loop devices; without them it says so and passes.
    #[test]
    fn direct_io_on_4k_sector_storage_reports_4k_blocks_optional() {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(4 << 20).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size", "4096"])
            .arg(img.path())
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            other => {
                eprintln!("SKIPPED (optional): no 4 KiB loop device here ({other:?})");
                return;
            }
        };
        let result = std::panic::catch_unwind(|| {
            let d = DiskFile::open(Path::new(&dev), false, true, "").unwrap();
            assert_eq!(d.block_size(), 4096);
            // A 4 KiB O_DIRECT write and read at a 4 KiB boundary go through.
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; 8192];
            let aligned = buf.as_ptr().align_offset(4096);
            let block = &mut buf[aligned..aligned + 4096];
            block.fill(0x5a);
            d.file().write_all_at(block, 4096).unwrap();
            block.fill(0);
            d.file().read_exact_at(block, 4096).unwrap();
            assert!(block.iter().all(|&b| b == 0x5a));
        });
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }
}
