//! Executing parsed virtio-blk requests against a raw host file.
//!
//! Like [`super::request`], this knows guest memory and a file only, so the
//! vhost-user-blk backend can run the same code.

use super::request::{Range, Request, RequestType, Segment, SECTOR_SHIFT, SECTOR_SIZE};
use super::BlockError;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Address, Bytes, GuestMemory};

/// Size of the bounce buffer that all disk I/O goes through (and the largest single
/// pread/pwrite the device issues).
pub const BOUNCE_SIZE: usize = 1 << 20;
/// Alignment of the bounce buffer (enough for O_DIRECT on 4 KiB-sector disks).
pub const BOUNCE_ALIGN: usize = 4096;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// An open disk image, shared by all the queues (and workers) of a device.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    capacity_sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
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
            id: id_buf,
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

    /// Makes every write so far durable (fdatasync), as a FLUSH request does; for
    /// hosts that stop or hand the disk over.
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A page-aligned scratch buffer for disk I/O (O_DIRECT needs aligned memory).
struct BounceBuffer {
    storage: Vec<u8>,
    start: usize,
}

impl BounceBuffer {
    fn new() -> Self {
        let storage = vec![0u8; BOUNCE_SIZE + BOUNCE_ALIGN];
        let start = storage
            .as_ptr()
            .align_offset(BOUNCE_ALIGN)
            .min(BOUNCE_ALIGN);
        Self { storage, start }
    }

    /// The first `len` (≤ BOUNCE_SIZE) aligned bytes.
    fn get(&mut self, len: usize) -> io::Result<&mut [u8]> {
        let end = self.start.checked_add(len.min(BOUNCE_SIZE));
        end.and_then(|end| self.storage.get_mut(self.start..end))
            .ok_or_else(|| io::Error::other("bounce buffer out of range"))
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
    fn ok() -> Self {
        Self {
            status: VIRTIO_BLK_S_OK as u8,
            written_to_guest: 0,
            bytes_read: 0,
            bytes_written: 0,
        }
    }

    fn ioerr() -> Self {
        Self {
            status: VIRTIO_BLK_S_IOERR as u8,
            ..Self::ok()
        }
    }

    /// The used length for the used ring: the guest-written data plus the status byte.
    pub fn used_len(&self) -> u32 {
        self.written_to_guest.saturating_add(1)
    }
}

/// Executes requests on a [`DiskFile`]. Each worker has its own (it owns a bounce
/// buffer); they share the file.
pub struct BlockBackend {
    disk: Arc<DiskFile>,
    bounce: BounceBuffer,
    writeback: bool,
}

impl BlockBackend {
    /// A backend on `disk`, in write-through mode until [`Self::set_writeback`].
    pub fn new(disk: Arc<DiskFile>) -> Self {
        Self {
            disk,
            bounce: BounceBuffer::new(),
            writeback: false,
        }
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<DiskFile> {
        &self.disk
    }

    /// With writeback (the driver negotiated VIRTIO_BLK_F_FLUSH) writes may stay in
    /// the host page cache until FLUSH; without it every write is followed by
    /// fdatasync.
    pub fn set_writeback(&mut self, writeback: bool) {
        self.writeback = writeback;
    }

    /// Executes `req`, moving data between the disk and the guest buffers in `mem`.
    /// Does not write the status byte (see [`super::complete_request`]).
    pub fn execute<M: GuestMemory + ?Sized>(&mut self, req: &Request, mem: &M) -> Completion {
        let writes = matches!(
            req.request_type,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && self.disk.readonly {
            log::debug!("write request to a read-only disk refused");
            return Completion::ioerr();
        }
        let result = match req.request_type {
            RequestType::In => self.read(req, mem),
            RequestType::Out => self.write(req, mem),
            RequestType::Flush => self.disk.file.sync_data().map(|_| Completion::ok()),
            RequestType::GetId => self.get_id(req, mem),
            RequestType::Discard | RequestType::WriteZeroes => self.zero_ranges(req),
            RequestType::Unsupported(_) => Ok(Completion {
                status: virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8,
                ..Completion::ok()
            }),
        };
        let result = result.and_then(|c| {
            if writes && !self.writeback && c.status == VIRTIO_BLK_S_OK as u8 {
                self.disk.file.sync_data()?;
            }
            Ok(c)
        });
        result.unwrap_or_else(|e| {
            log::debug!("virtio-blk {:?} failed: {e}", req.request_type);
            Completion::ioerr()
        })
    }

    fn read<M: GuestMemory + ?Sized>(&mut self, req: &Request, mem: &M) -> io::Result<Completion> {
        let total = req.data_len();
        let mut offset = disk_offset(req.sector)?;
        let mut cursor = SegmentCursor::new(&req.data);
        let mut done = 0u64;
        while done < total {
            let chunk = (total - done).min(BOUNCE_SIZE as u64) as usize;
            let buf = self.bounce.get(chunk)?;
            self.disk.file.read_exact_at(buf, offset)?;
            cursor.scatter(mem, buf)?;
            done += chunk as u64;
            offset += chunk as u64;
        }
        Ok(Completion {
            written_to_guest: u32::try_from(total).map_err(io::Error::other)?,
            bytes_read: total,
            ..Completion::ok()
        })
    }

    fn write<M: GuestMemory + ?Sized>(&mut self, req: &Request, mem: &M) -> io::Result<Completion> {
        let total = req.data_len();
        let mut offset = disk_offset(req.sector)?;
        let mut cursor = SegmentCursor::new(&req.data);
        let mut done = 0u64;
        while done < total {
            let chunk = (total - done).min(BOUNCE_SIZE as u64) as usize;
            let buf = self.bounce.get(chunk)?;
            cursor.gather(mem, buf)?;
            self.disk.file.write_all_at(buf, offset)?;
            done += chunk as u64;
            offset += chunk as u64;
        }
        Ok(Completion {
            bytes_written: total,
            ..Completion::ok()
        })
    }

    fn get_id<M: GuestMemory + ?Sized>(
        &mut self,
        req: &Request,
        mem: &M,
    ) -> io::Result<Completion> {
        let total = (req.data_len().min(ID_BYTES as u64)) as usize;
        let src = self
            .disk
            .id
            .get(..total)
            .ok_or_else(|| io::Error::other("id out of range"))?;
        SegmentCursor::new(&req.data).scatter(mem, src)?;
        Ok(Completion {
            written_to_guest: total as u32,
            ..Completion::ok()
        })
    }

    fn zero_ranges(&mut self, req: &Request) -> io::Result<Completion> {
        let mut zeroed = 0u64;
        for r in &req.ranges {
            self.zero_range(req.request_type, r)?;
            zeroed += u64::from(r.num_sectors) << SECTOR_SHIFT;
        }
        Ok(Completion {
            bytes_written: zeroed,
            ..Completion::ok()
        })
    }

    /// DISCARD punches a hole; WRITE_ZEROES zeroes the range (punching a hole when the
    /// driver allows unmapping). When the file system cannot, zeros are written.
    fn zero_range(&mut self, kind: RequestType, r: &Range) -> io::Result<()> {
        let offset = disk_offset(r.sector)?;
        let len = u64::from(r.num_sectors) << SECTOR_SHIFT;
        if len == 0 {
            return Ok(());
        }
        let unmap =
            kind == RequestType::Discard || r.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(&self.disk.file, mode, offset, len) {
            Ok(()) => return Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
                ) =>
            {
                log::debug!("fallocate mode {mode:#x} unsupported ({e}); writing zeros");
            }
            Err(e) => return Err(e),
        }
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(BOUNCE_SIZE as u64) as usize;
            let buf = self.bounce.get(chunk)?;
            buf.fill(0);
            self.disk.file.write_all_at(buf, offset + done)?;
            done += chunk as u64;
        }
        Ok(())
    }
}

fn disk_offset(sector: u64) -> io::Result<u64> {
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| io::Error::other("sector offset overflows"))
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`,
    // which outlives the call.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Walks a request's segments as one byte stream.
struct SegmentCursor<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> SegmentCursor<'a> {
    fn new(segments: &'a [Segment]) -> Self {
        Self {
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// Calls `f(guest address, range of buf)` for the next `buf_len` bytes.
    fn walk(
        &mut self,
        buf_len: usize,
        mut f: impl FnMut(vm_memory::GuestAddress, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut pos = 0usize;
        while pos < buf_len {
            let seg = self
                .segments
                .get(self.index)
                .ok_or_else(|| io::Error::other("request data shorter than expected"))?;
            let left_in_seg = (seg.len - self.offset) as usize;
            if left_in_seg == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = left_in_seg.min(buf_len - pos);
            let addr = seg
                .addr
                .checked_add(u64::from(self.offset))
                .ok_or_else(|| io::Error::other("guest address overflows"))?;
            f(addr, pos..pos + n)?;
            pos += n;
            self.offset += n as u32;
        }
        Ok(())
    }

    fn scatter<M: GuestMemory + ?Sized>(&mut self, mem: &M, buf: &[u8]) -> io::Result<()> {
        self.walk(buf.len(), |addr, range| {
            let src = buf.get(range).ok_or_else(|| io::Error::other("range"))?;
            mem.write_slice(src, addr).map_err(io::Error::other)
        })
    }

    fn gather<M: GuestMemory + ?Sized>(&mut self, mem: &M, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        self.walk(len, |addr, range| {
            let dst = buf
                .get_mut(range)
                .ok_or_else(|| io::Error::other("range"))?;
            mem.read_slice(dst, addr).map_err(io::Error::other)
        })
    }
}
