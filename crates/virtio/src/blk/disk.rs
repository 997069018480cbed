//! The disk image a device serves (shared by every queue and engine of the device) and
//! the result of one executed request.

use super::request::{SECTOR_SHIFT, SECTOR_SIZE};
use super::BlockError;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
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
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let mut file = options.open(path).map_err(open_err)?;
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
        })
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
