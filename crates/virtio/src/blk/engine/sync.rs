//! The `sync` engine: each request runs to its end on the worker's thread, with
//! preadv/pwritev straight between the disk file and the guest's buffers.
//!
//! A bounce buffer is used only where the kernel cannot take the guest's buffers as
//! they are: an O_DIRECT disk and buffers that are not 512-byte aligned (then the data
//! is copied through an aligned buffer), and zeroes written where the file system
//! cannot punch or zero a range.

use super::super::disk::{Completion, DiskFile};
use super::super::request::{Range, Request, RequestType, SECTOR_SHIFT, SECTOR_SIZE};
use super::iovec::{transfer_all, Direction, IoVecs};
use super::{BlockEngine, EngineKind, Finished, Submitted};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

/// Size of the bounce buffer (and the largest single pread/pwrite through it).
pub const BOUNCE_SIZE: usize = 1 << 20;
/// Alignment of the bounce buffer (enough for O_DIRECT on 4 KiB-sector disks).
pub const BOUNCE_ALIGN: usize = 4096;
/// The alignment O_DIRECT transfers from guest buffers need here.
const DIRECT_ALIGN: usize = SECTOR_SIZE as usize;

/// Runs requests synchronously on a [`DiskFile`]. Each queue has its own; they share
/// the file.
pub struct SyncEngine {
    disk: Arc<DiskFile>,
    iov: IoVecs,
    bounce: Option<BounceBuffer>,
    writeback: bool,
}

impl SyncEngine {
    /// An engine on `disk`, in write-through mode until [`BlockEngine::set_writeback`].
    pub fn new(disk: Arc<DiskFile>) -> Self {
        Self {
            disk,
            iov: IoVecs::with_capacity(super::IOVECS_PER_REQUEST),
            bounce: None,
            writeback: false,
        }
    }

    /// The disk the engine serves.
    pub fn disk(&self) -> &DiskFile {
        &self.disk
    }

    /// Executes `req`, moving data between the disk and the guest buffers in `mem`.
    /// Does not write the status byte (see [`crate::blk::complete_request`]).
    pub fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> Completion {
        let writes = req.request_type.writes_disk();
        if writes && self.disk.readonly() {
            log::debug!("write request to a read-only disk refused");
            return Completion::ioerr();
        }
        let result = match req.request_type {
            RequestType::In => self.transfer(Direction::Read, req, mem),
            RequestType::Out => self.transfer(Direction::Write, req, mem),
            RequestType::Flush => self.disk.sync_data().map(|_| Completion::ok()),
            RequestType::GetId => get_id(&self.disk, req, mem),
            RequestType::Discard | RequestType::WriteZeroes => self.zero_ranges(req),
            RequestType::Unsupported(_) => Ok(Completion {
                status: VIRTIO_BLK_S_UNSUPP as u8,
                ..Completion::ok()
            }),
        };
        let result = result.and_then(|c| {
            if writes && !self.writeback && c.status == VIRTIO_BLK_S_OK as u8 {
                self.disk.sync_data()?;
            }
            Ok(c)
        });
        result.unwrap_or_else(|e| {
            log::debug!("virtio-blk {:?} failed: {e}", req.request_type);
            Completion::ioerr()
        })
    }

    /// Moves the rest of a transfer that another engine started and that ended short:
    /// `iov` (already advanced past what was done) at `offset`.
    pub fn finish_transfer(
        &mut self,
        dir: Direction,
        iov: &mut IoVecs,
        offset: u64,
    ) -> io::Result<()> {
        transfer_all(self.disk.file(), dir, iov, offset)
    }

    /// An IN (`Read`) or OUT (`Write`) request's data, straight or through the bounce
    /// buffer where O_DIRECT cannot take the guest's buffers.
    fn transfer(
        &mut self,
        dir: Direction,
        req: &Request,
        mem: &GuestMemoryMmap,
    ) -> io::Result<Completion> {
        let total = self.iov.fill(mem, &req.data)?;
        let offset = disk_offset(req.sector)?;
        if self.needs_bounce() {
            self.bounced(dir, req, mem, offset)?;
        } else {
            transfer_all(self.disk.file(), dir, &mut self.iov, offset)?;
        }
        Ok(transferred(dir, total))
    }

    /// O_DIRECT and guest buffers that it cannot take as they are.
    fn needs_bounce(&self) -> bool {
        self.disk.direct()
            && !self
                .iov
                .aligned_to(DIRECT_ALIGN.max(self.disk.block_size() as usize))
    }

    /// A transfer through the aligned bounce buffer, `BOUNCE_SIZE` at a time.
    fn bounced(
        &mut self,
        dir: Direction,
        req: &Request,
        mem: &GuestMemoryMmap,
        mut offset: u64,
    ) -> io::Result<()> {
        let bounce = self.bounce.get_or_insert_with(BounceBuffer::new);
        let total = req.data_len();
        let mut cursor = SegmentCursor::new(&req.data);
        let mut done = 0u64;
        while done < total {
            let chunk = (total - done).min(BOUNCE_SIZE as u64) as usize;
            let buf = bounce.get(chunk)?;
            match dir {
                Direction::Read => {
                    self.disk.file().read_exact_at(buf, offset)?;
                    cursor.scatter(mem, buf)?;
                }
                Direction::Write => {
                    cursor.gather(mem, buf)?;
                    self.disk.file().write_all_at(buf, offset)?;
                }
            }
            done += chunk as u64;
            offset += chunk as u64;
        }
        Ok(())
    }

    fn zero_ranges(&mut self, req: &Request) -> io::Result<Completion> {
        let mut zeroed = 0u64;
        for r in &req.ranges {
            self.zero_range(req.request_type, r)?;
            zeroed += u64::from(r.num_sectors) << SECTOR_SHIFT;
        }
        Ok(Completion::written(zeroed))
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
        match fallocate(self.disk.file(), mode, offset, len) {
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
        let bounce = self.bounce.get_or_insert_with(BounceBuffer::new);
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(BOUNCE_SIZE as u64) as usize;
            let buf = bounce.get(chunk)?;
            buf.fill(0);
            self.disk.file().write_all_at(buf, offset + done)?;
            done += chunk as u64;
        }
        Ok(())
    }
}

impl BlockEngine for SyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn set_writeback(&mut self, writeback: bool) {
        self.writeback = writeback;
    }

    fn submit(&mut self, _head: u16, req: &Request, mem: &Arc<GuestMemoryMmap>) -> Submitted {
        Submitted::Done(self.execute(req, mem))
    }

    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn reap(&mut self, _done: &mut Vec<Finished>) {}

    fn in_flight(&self) -> usize {
        0
    }

    fn wait_idle(&mut self, _done: &mut Vec<Finished>) {}
}

/// Answers GET_ID from the disk's id (no I/O).
pub(super) fn get_id(
    disk: &DiskFile,
    req: &Request,
    mem: &GuestMemoryMmap,
) -> io::Result<Completion> {
    let total = (req.data_len().min(disk.id().len() as u64)) as usize;
    let src = disk
        .id()
        .get(..total)
        .ok_or_else(|| io::Error::other("id out of range"))?;
    SegmentCursor::new(&req.data).scatter(mem, src)?;
    Ok(Completion {
        written_to_guest: total as u32,
        ..Completion::ok()
    })
}

/// The completion of a transfer of `len` bytes in direction `dir`.
pub(super) fn transferred(dir: Direction, len: u64) -> Completion {
    match dir {
        Direction::Read => Completion::read(len),
        Direction::Write => Completion::written(len),
    }
}

/// The byte offset of `sector`.
pub(super) fn disk_offset(sector: u64) -> io::Result<u64> {
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| io::Error::other("sector offset overflows"))
}

fn fallocate(file: &std::fs::File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
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

/// Walks a request's segments as one byte stream.
struct SegmentCursor<'a> {
    segments: &'a [super::super::request::Segment],
    index: usize,
    offset: u32,
}

impl<'a> SegmentCursor<'a> {
    fn new(segments: &'a [super::super::request::Segment]) -> Self {
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

    fn scatter(&mut self, mem: &GuestMemoryMmap, buf: &[u8]) -> io::Result<()> {
        self.walk(buf.len(), |addr, range| {
            let src = buf.get(range).ok_or_else(|| io::Error::other("range"))?;
            mem.write_slice(src, addr).map_err(io::Error::other)
        })
    }

    fn gather(&mut self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        self.walk(len, |addr, range| {
            let dst = buf
                .get_mut(range)
                .ok_or_else(|| io::Error::other("range"))?;
            mem.read_slice(dst, addr).map_err(io::Error::other)
        })
    }
}
