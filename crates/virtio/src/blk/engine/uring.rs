//! The `io_uring` engine: reads, writes and flushes of one queue go to a ring of their
//! own and complete on their own time, many at once and in any order.
//!
//! * One ring per queue with as many entries as the queue; a request's user data is
//!   its chain's head index, which also names the slot that keeps the request's iovecs
//!   and a reference to the guest memory they point into until its completion.
//! * The ring's completion eventfd (`register_eventfd`, so every completion signals
//!   it) is what the worker's epoll watches; each wake-up drains the completion queue.
//! * FLUSH is an fdatasync submitted with IOSQE_IO_DRAIN: it starts only after every
//!   request submitted before it has completed, and requests submitted after it wait
//!   for it.
//! * Without writeback (the driver did not negotiate VIRTIO_BLK_F_FLUSH) writes carry
//!   RWF_DSYNC, so their completion means they are durable.
//! * A read or write that the kernel completes short is finished synchronously.
//! * GET_ID, DISCARD, WRITE_ZEROES and unknown types run synchronously
//!   ([`SyncEngine`]), as does anything the ring cannot take (more than IOV_MAX pieces,
//!   O_DIRECT with unaligned guest buffers).
//! * Dropping the engine waits for every request still in the kernel.

use super::super::disk::{Completion, DiskFile};
use super::super::request::{Request, RequestType, SECTOR_SIZE};
use super::iovec::{Direction, IoVecs};
use super::sync::{disk_offset, transferred, SyncEngine};
use super::{BlockEngine, EngineKind, Finished, Submitted};
use io_uring::{opcode, squeue, types, IoUring, Probe};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The iovecs a slot starts with (a 4 KiB request spanning two regions at most).
const SLOT_IOVECS: usize = 4;
/// Most iovecs one readv/writev takes (UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// The opcodes the engine needs, with their names for errors.
const NEEDED: [(u8, &str); 3] = [
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Fsync::CODE, "FSYNC"),
];

/// Checks that this host gives a process io_uring with the opcodes the engine needs:
/// creates a small ring and probes it. The error says why not (ENOSYS: no io_uring in
/// the kernel; EPERM: disabled by sysctl or a seccomp filter; ENOMEM: memlock limit).
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(2)?;
    check_opcodes(&ring)
}

fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in NEEDED {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel's io_uring has no {name}"),
            ));
        }
    }
    Ok(())
}

/// One chain in the kernel (or free).
struct Slot {
    busy: bool,
    iov: IoVecs,
    /// Keeps the guest memory the iovecs point into mapped until the completion.
    mem: Option<Arc<GuestMemoryMmap>>,
    request_type: RequestType,
    status_addr: GuestAddress,
    offset: u64,
    len: u64,
}

/// The io_uring engine of one queue.
pub struct UringEngine {
    ring: IoUring,
    completions: EventFd,
    disk: Arc<DiskFile>,
    slots: Vec<Slot>,
    in_flight: usize,
    unsubmitted: usize,
    inline: SyncEngine,
    writeback: bool,
}

impl UringEngine {
    /// An engine for a queue of `queue_size` entries on `disk`.
    pub fn new(disk: Arc<DiskFile>, queue_size: u16) -> io::Result<Self> {
        let entries = u32::from(queue_size.max(1)).next_power_of_two();
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        check_opcodes(&ring)?;
        let completions = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(completions.as_raw_fd())?;
        let slots = (0..queue_size)
            .map(|_| Slot {
                busy: false,
                // Grown by the first request that needs more, then kept: a queue's
                // slots do not take 256 × the largest request's room up front.
                iov: IoVecs::with_capacity(SLOT_IOVECS),
                mem: None,
                request_type: RequestType::In,
                status_addr: GuestAddress(0),
                offset: 0,
                len: 0,
            })
            .collect();
        Ok(Self {
            ring,
            completions,
            inline: SyncEngine::new(disk.clone()),
            disk,
            slots,
            in_flight: 0,
            unsubmitted: 0,
            writeback: false,
        })
    }

    /// Puts `entry` in the submission queue, submitting what is queued first when it is
    /// full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: every buffer the entry names (the slot's iovec list and the guest
            // memory it points into, held by the slot's `mem`) stays alive and unmoved
            // until its completion is reaped: the slot is not reused while busy, and
            // dropping the engine waits for every request in flight.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.start()?;
        }
        Err(io::Error::other("the submission queue stays full"))
    }

    fn finish(&mut self, head: u16, result: i32) -> Option<Finished> {
        let slot = self.slots.get_mut(usize::from(head))?;
        if !slot.busy {
            log::error!("io_uring completion for head {head}, which is not in flight");
            return None;
        }
        slot.busy = false;
        self.in_flight -= 1;
        let mem = slot.mem.take();
        let completion = match slot.request_type {
            RequestType::In | RequestType::Out => {
                let dir = if slot.request_type == RequestType::In {
                    Direction::Read
                } else {
                    Direction::Write
                };
                match u64::try_from(result) {
                    Err(_) => {
                        log::debug!(
                            "virtio-blk {:?} failed: {}",
                            slot.request_type,
                            io::Error::from_raw_os_error(-result)
                        );
                        Completion::ioerr()
                    }
                    Ok(done) if done >= slot.len => transferred(dir, slot.len),
                    Ok(done) => {
                        // Short: the rest synchronously, from where the kernel stopped.
                        slot.iov.advance(done as usize);
                        let rest =
                            self.inline
                                .finish_transfer(dir, &mut slot.iov, slot.offset + done);
                        match rest {
                            Ok(()) => transferred(dir, slot.len),
                            Err(e) => {
                                log::debug!("virtio-blk {:?} failed: {e}", slot.request_type);
                                Completion::ioerr()
                            }
                        }
                    }
                }
            }
            _ if result < 0 => {
                log::debug!(
                    "virtio-blk {:?} failed: {}",
                    slot.request_type,
                    io::Error::from_raw_os_error(-result)
                );
                if slot.request_type == RequestType::Flush {
                    self.inline.disk().note_flush_failed();
                }
                Completion::ioerr()
            }
            // Once a flush failed, a later fdatasync that succeeds proves nothing.
            RequestType::Flush if self.inline.disk().flush_failed() => Completion::ioerr(),
            _ => Completion::ok(),
        };
        drop(mem);
        Some(Finished {
            head,
            status_addr: slot.status_addr,
            request_type: slot.request_type,
            completion,
        })
    }

    /// Prepares slot `head` for `req` and returns the entry to submit, or `None` when
    /// the request must run synchronously.
    fn prepare(
        &mut self,
        head: u16,
        req: &Request,
        mem: &Arc<GuestMemoryMmap>,
    ) -> io::Result<Option<squeue::Entry>> {
        let fd = types::Fd(self.disk.file().as_raw_fd());
        let writeback = self.writeback;
        let direct = self.disk.direct();
        let slot = self
            .slots
            .get_mut(usize::from(head))
            .ok_or_else(|| io::Error::other(format!("head {head} beyond the queue")))?;
        if slot.busy {
            // A driver that posts a chain again before the device answered it.
            return Err(io::Error::other(format!(
                "head {head} posted again while still in flight"
            )));
        }
        let entry = match req.request_type {
            RequestType::In | RequestType::Out => {
                slot.len = slot.iov.fill(mem, &req.data)?;
                slot.offset = disk_offset(req.sector)?;
                let list = slot.iov.as_slice();
                if list.len() > IOV_MAX || (direct && !slot.iov.aligned_to(SECTOR_SIZE as usize)) {
                    return Ok(None);
                }
                let (ptr, count) = (list.as_ptr(), list.len() as u32);
                if req.request_type == RequestType::In {
                    opcode::Readv::new(fd, ptr, count)
                        .offset(slot.offset)
                        .build()
                } else {
                    let flags = if writeback { 0 } else { libc::RWF_DSYNC };
                    opcode::Writev::new(fd, ptr, count)
                        .offset(slot.offset)
                        .rw_flags(flags)
                        .build()
                }
            }
            RequestType::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
            _ => return Ok(None),
        };
        slot.request_type = req.request_type;
        slot.status_addr = req.status_addr;
        slot.mem = Some(mem.clone());
        slot.busy = true;
        Ok(Some(entry.user_data(u64::from(head))))
    }
}

impl BlockEngine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }

    fn set_writeback(&mut self, writeback: bool) {
        self.writeback = writeback;
        self.inline.set_writeback(writeback);
    }

    fn submit(&mut self, head: u16, req: &Request, mem: &Arc<GuestMemoryMmap>) -> Submitted {
        if req.request_type.writes_disk() && self.disk.readonly() {
            log::debug!("write request to a read-only disk refused");
            return Submitted::Done(Completion::ioerr());
        }
        let entry = match self.prepare(head, req, mem) {
            Ok(Some(entry)) => entry,
            Ok(None) => return Submitted::Done(self.inline.execute(req, mem)),
            Err(e) => {
                log::debug!("virtio-blk {:?} refused: {e}", req.request_type);
                return Submitted::Done(Completion::ioerr());
            }
        };
        match self.push(&entry) {
            Ok(()) => {
                self.in_flight += 1;
                Submitted::InFlight
            }
            Err(e) => {
                log::error!("virtio-blk: cannot queue a request on io_uring: {e}");
                if let Some(slot) = self.slots.get_mut(usize::from(head)) {
                    slot.busy = false;
                    slot.mem = None;
                }
                Submitted::Done(Completion::ioerr())
            }
        }
    }

    fn start(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.completions.as_raw_fd())
    }

    fn reap(&mut self, done: &mut Vec<Finished>) {
        // Clear the eventfd first: a completion posted after the drain signals it anew.
        let _ = self.completions.read();
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            let Ok(head) = u16::try_from(cqe.user_data()) else {
                log::error!("io_uring completion with user data {}", cqe.user_data());
                continue;
            };
            if let Some(f) = self.finish(head, cqe.result()) {
                done.push(f);
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn has_completions(&mut self) -> bool {
        self.in_flight > 0 && !self.ring.completion().is_empty()
    }

    fn wait_idle(&mut self, done: &mut Vec<Finished>) {
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    log::error!(
                        "io_uring: waiting for {} request(s) failed: {e}",
                        self.in_flight
                    );
                    return;
                }
            }
            self.reap(done);
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        let mut discarded = Vec::new();
        self.wait_idle(&mut discarded);
        if self.in_flight > 0 {
            // The kernel may still write into guest memory and iovecs: leak them rather
            // than free memory it uses.
            log::error!(
                "io_uring engine dropped with {} request(s) in flight; leaking their buffers",
                self.in_flight
            );
            for slot in &mut self.slots {
                if slot.busy {
                    std::mem::forget(slot.mem.take());
                    std::mem::forget(std::mem::take(&mut slot.iov));
                }
            }
        }
    }
}
