//! A descriptor chain as `iovec`s into guest memory, so that a frame goes between the
//! guest's buffers and the tap with one `readv` or `writev` and no copy.

use std::fmt;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::fault::FaultKind;

/// Why a chain cannot carry a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainFault {
    /// A descriptor the device was to read is device-writable, or the reverse.
    WrongDirection,
    /// A descriptor lies (partly) outside guest memory.
    OutOfMemory,
    /// The chain is cut short: a loop, a bad next index or a bad indirect table.
    Broken,
    /// The buffers are shorter than a virtio-net header.
    TooShort,
    /// A control command has no device-writable byte for its answer.
    NoAck,
}

impl fmt::Display for ChainFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChainFault::WrongDirection => "a descriptor in the wrong direction",
            ChainFault::OutOfMemory => "a descriptor outside guest memory",
            ChainFault::Broken => {
                "descriptor chain is broken (loop, bad next index or bad indirect table)"
            }
            ChainFault::TooShort => "buffers shorter than the virtio-net header",
            ChainFault::NoAck => "control command without a writable answer byte",
        })
    }
}

impl FaultKind for ChainFault {
    fn kind(&self) -> u32 {
        *self as u32
    }
}

/// Appends the buffers of `chain` to `iovs`, all of them device-writable (`writable`:
/// a receive buffer) or all device-readable (a frame to send); returns their total
/// length. On a fault `iovs` is left as it was.
pub fn chain_iovecs<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    writable: bool,
    iovs: &mut Vec<libc::iovec>,
) -> Result<usize, ChainFault> {
    let start = iovs.len();
    let mut total = 0usize;
    let mut last_has_next = false;
    let result = (|| {
        for d in chain {
            last_has_next = d.has_next();
            if d.is_write_only() != writable {
                return Err(ChainFault::WrongDirection);
            }
            if d.len() == 0 {
                continue;
            }
            push_iovecs(mem, d.addr(), d.len() as usize, writable, iovs)?;
            total += d.len() as usize;
        }
        if last_has_next {
            return Err(ChainFault::Broken);
        }
        Ok(total)
    })();
    if result.is_err() {
        iovs.truncate(start);
    }
    result
}

/// Appends iovecs for the `len` bytes of guest memory at `addr` (one per memory region
/// they span), checked for `writable` access.
pub fn push_iovecs<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    writable: bool,
    iovs: &mut Vec<libc::iovec>,
) -> Result<(), ChainFault> {
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let slices = mem
        .get_slices(addr, len, access)
        .map_err(|_| ChainFault::OutOfMemory)?;
    for slice in slices {
        let slice = slice.map_err(|_| ChainFault::OutOfMemory)?;
        iovs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    Ok(())
}

/// Writes `bytes` at byte `offset` of the buffers `iovs` (the part that fits).
///
/// # Safety
///
/// Every iovec must point at memory valid for writing (guest memory the caller holds).
pub unsafe fn write_at(iovs: &[libc::iovec], offset: usize, bytes: &[u8]) {
    let mut skip = offset;
    let mut src = bytes;
    for iov in iovs {
        if src.is_empty() {
            return;
        }
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        let n = (iov.iov_len - skip).min(src.len());
        // SAFETY: `skip + n <= iov_len`, and the caller vouches for the iovec.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), iov.iov_base.cast::<u8>().add(skip), n);
        }
        src = &src[n..];
        skip = 0;
    }
}

/// Copies the first `out.len()` bytes of the buffers `iovs` into `out`; returns how
/// many there were.
///
/// # Safety
///
/// Every iovec must point at memory valid for reading.
pub unsafe fn read_prefix(iovs: &[libc::iovec], out: &mut [u8]) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == out.len() {
            break;
        }
        let n = iov.iov_len.min(out.len() - done);
        // SAFETY: `n <= iov_len`, and the caller vouches for the iovec.
        unsafe {
            std::ptr::copy_nonoverlapping(iov.iov_base.cast::<u8>(), out[done..].as_mut_ptr(), n);
        }
        done += n;
    }
    done
}
