//! The part of every vhost frontend that does not depend on the kind of backend:
//! the memory table, and handing the guest's rings over and taking them back, over
//! the vhost crate's [`VhostBackend`] trait (which both the vhost-user `Frontend` and
//! the kernel's vhost backends implement).
//!
//! [`start`]: SET_FEATURES, SET_MEM_TABLE, then per ring SET_VRING_NUM,
//! SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL (the device's irqfd), SET_VRING_KICK
//! (the queue's kick eventfd, which KVM signals as its ioeventfd) and the backend's own
//! way of starting a ring ([`VhostConn::enable_ring`]). [`stop`]: the backend's way of
//! stopping a ring, then GET_VRING_BASE.

use std::io;
use std::path::PathBuf;

use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Errors of the conversation with a vhost backend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The backend cannot be reached.
    #[error("cannot connect to {path}: {source}{hint}")]
    Connect {
        /// The socket or device node.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
        /// Advice for the usual causes.
        hint: &'static str,
    },
    /// A request failed or was answered with an error.
    #[error("{request} failed: {source}")]
    Request {
        /// The vhost request.
        request: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend left a request unanswered for too long.
    #[error("the backend did not answer {request} within {secs} s")]
    NoAnswer {
        /// The request.
        request: &'static str,
        /// The limit.
        secs: u64,
    },
    /// The backend lacks a feature evmm needs.
    #[error("the backend does not offer {0}, which evmm needs")]
    MissingFeature(&'static str),
    /// More queues asked for than the backend has.
    #[error("queues={requested} but the backend supports at most {max}")]
    TooManyQueues {
        /// `queues=` on the command line.
        requested: u16,
        /// What the backend supports.
        max: u64,
    },
    /// Several queues asked for from a backend whose device cannot have them.
    #[error("queues={0} needs a multi-queue device, which the backend does not offer")]
    NoMultiqueue(u16),
    /// A guest memory region cannot be shared (it has no file descriptor).
    #[error("guest memory region at {0:#x} has no file descriptor to share")]
    Memory(u64),
    /// A ring is not inside one guest memory region.
    #[error("queue {queue}: its {ring} at {addr:#x} is not inside guest memory")]
    Ring {
        /// The queue index.
        queue: usize,
        /// "descriptor table", "available ring" or "used ring".
        ring: &'static str,
        /// Its guest-physical address.
        addr: u64,
    },
}

impl FrontendError {
    /// Whether the error is evmm's own, found before anything was sent (guest memory
    /// that cannot be shared, a ring outside memory): the backend is not to blame.
    pub fn is_local(&self) -> bool {
        matches!(self, FrontendError::Memory(_) | FrontendError::Ring { .. })
    }
}

/// Which addresses SET_VRING_ADDR takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingAddresses {
    /// evmm's own (virtual) addresses of the rings: vhost-user.
    Vmm,
    /// Guest-physical addresses, which the backend translates itself: the kernel's
    /// vhost backends (through the memory table the vhost crate keeps).
    Guest,
}

/// A connection to a vhost backend, as [`start`] and [`stop`] use it.
pub trait VhostConn {
    /// The vhost crate's backend.
    type Backend: VhostBackend;
    /// Which addresses SET_VRING_ADDR takes.
    const RING_ADDRESSES: RingAddresses;

    /// Runs one request, named for errors (and, for a backend that may stop answering,
    /// timed).
    fn call<T>(
        &mut self,
        request: &'static str,
        f: impl FnOnce(&Self::Backend) -> vhost::Result<T>,
    ) -> Result<T, FrontendError>;

    /// Starts ring `index` once it is set up (vhost-user: SET_VRING_ENABLE 1).
    fn enable_ring(&mut self, index: usize) -> Result<(), FrontendError>;

    /// Stops ring `index` before its base is read back (nothing to do where
    /// GET_VRING_BASE stops it, as in vhost-user).
    fn disable_ring(&mut self, index: usize) -> Result<(), FrontendError>;
}

/// One queue the backend is to run.
pub struct RingSetup<'a> {
    /// The virtio queue index.
    pub index: usize,
    /// The queue as the driver set it up (guest-physical ring addresses).
    pub queue: &'a Queue,
    /// The eventfd KVM signals for this queue's QueueNotify.
    pub kick: &'a EventFd,
}

/// Hands the guest's memory and `rings` to the backend and starts them, with `call`
/// (the device's irqfd) as every ring's call eventfd. Memory regions and ring addresses
/// are checked before anything is sent ([`FrontendError::is_local`]).
pub fn start<C: VhostConn>(
    conn: &mut C,
    mem: &GuestMemoryMmap,
    features: u64,
    rings: &[RingSetup<'_>],
    call: &EventFd,
) -> Result<(), FrontendError> {
    let regions = memory_regions(mem)?;
    let configs = rings
        .iter()
        .map(|r| vring_config(mem, r.index, r.queue, C::RING_ADDRESSES))
        .collect::<Result<Vec<_>, _>>()?;
    conn.call("SET_FEATURES", |b| b.set_features(features))?;
    conn.call("SET_MEM_TABLE", |b| b.set_mem_table(&regions).map(|_| ()))?;
    for (ring, config) in rings.iter().zip(&configs) {
        let i = ring.index;
        let size = ring.queue.size();
        conn.call("SET_VRING_NUM", |b| b.set_vring_num(i, size))?;
        conn.call("SET_VRING_ADDR", |b| b.set_vring_addr(i, config))?;
        conn.call("SET_VRING_BASE", |b| b.set_vring_base(i, 0))?;
        // The call first: a backend may serve the ring as soon as it has the kick (a
        // kick the guest made before is pending in it), and must be able to signal.
        conn.call("SET_VRING_CALL", |b| b.set_vring_call(i, call))?;
        conn.call("SET_VRING_KICK", |b| b.set_vring_kick(i, ring.kick))?;
        conn.enable_ring(i)?;
    }
    Ok(())
}

/// The checks of [`start`] that need no message: every guest region can be shared
/// and every ring lies in one region. A setup that passes them fails [`start`] only
/// through the backend.
pub fn check_setup(
    mem: &GuestMemoryMmap,
    rings: &[RingSetup<'_>],
    addresses: RingAddresses,
) -> Result<(), FrontendError> {
    memory_regions(mem)?;
    for r in rings {
        vring_config(mem, r.index, r.queue, addresses)?;
    }
    Ok(())
}

/// Stops the rings of `queues`; returns where each stopped (GET_VRING_BASE).
pub fn stop<C: VhostConn>(conn: &mut C, queues: &[usize]) -> Result<Vec<u32>, FrontendError> {
    queues
        .iter()
        .map(|&i| {
            conn.disable_ring(i)?;
            conn.call("GET_VRING_BASE", |b| b.get_vring_base(i))
        })
        .collect()
}

/// SET_MEM_TABLE's regions: each guest region's memfd and offset, guest address,
/// size and evmm's userspace address.
pub fn memory_regions(
    mem: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, FrontendError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r)
                .map_err(|_| FrontendError::Memory(r.start_addr().0))
        })
        .collect()
}

/// evmm's userspace address of `len` bytes at guest address `addr`, if they lie in
/// one region.
pub fn host_address(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<u64> {
    let (region, offset) = mem.to_region_addr(GuestAddress(addr))?;
    let end = offset.0.checked_add(len)?;
    if end > region.len() {
        return None;
    }
    region.get_host_address(offset).ok().map(|p| p as u64)
}

/// SET_VRING_ADDR's addresses of `queue`, each ring checked to lie in one guest memory
/// region, given as `addresses` asks.
pub fn vring_config(
    mem: &GuestMemoryMmap,
    index: usize,
    queue: &Queue,
    addresses: RingAddresses,
) -> Result<VringConfigData, FrontendError> {
    let size = u64::from(queue.size());
    let ring = |ring: &'static str, addr: u64, len: u64| {
        let host = host_address(mem, addr, len).ok_or(FrontendError::Ring {
            queue: index,
            ring,
            addr,
        })?;
        Ok(match addresses {
            RingAddresses::Vmm => host,
            RingAddresses::Guest => addr,
        })
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: ring("descriptor table", queue.desc_table(), 16 * size)?,
        used_ring_addr: ring("used ring", queue.used_ring(), 6 + 8 * size)?,
        avail_ring_addr: ring("available ring", queue.avail_ring(), 6 + 2 * size)?,
        log_addr: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::memfd_memory;
    use std::os::fd::AsRawFd;

    #[test]
    fn memory_regions_carry_the_memfd() {
        let mem = memfd_memory(16 << 20);
        let regions = memory_regions(&mem).unwrap();
        assert_eq!(regions.len(), 1);
        let r = &regions[0];
        assert_eq!(r.guest_phys_addr, 0);
        assert_eq!(r.memory_size, 16 << 20);
        assert_eq!(r.mmap_offset, 0);
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert_eq!(
            r.mmap_handle,
            region.file_offset().unwrap().file().as_raw_fd()
        );
        assert_eq!(
            r.userspace_addr,
            mem.get_host_address(GuestAddress(0)).unwrap() as u64
        );
        // Anonymous memory cannot be shared.
        let anon = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            memory_regions(&anon),
            Err(FrontendError::Memory(0))
        ));
    }

    #[test]
    fn ring_addresses_are_translated_and_checked() {
        let mem = memfd_memory(16 << 20);
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let mut q = Queue::new(256).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        let c = vring_config(&mem, 0, &q, RingAddresses::Vmm).unwrap();
        assert_eq!(c.desc_table_addr, base + 0x1000);
        assert_eq!(c.avail_ring_addr, base + 0x2000);
        assert_eq!(c.used_ring_addr, base + 0x3000);
        assert_eq!((c.queue_size, c.queue_max_size, c.flags), (16, 256, 0));
        let g = vring_config(&mem, 0, &q, RingAddresses::Guest).unwrap();
        assert_eq!(
            (g.desc_table_addr, g.avail_ring_addr, g.used_ring_addr),
            (0x1000, 0x2000, 0x3000)
        );
        // A used ring running past the end of memory.
        q.set_used_ring_address(Some((16 << 20) - 8), Some(0));
        for addresses in [RingAddresses::Vmm, RingAddresses::Guest] {
            let err = vring_config(&mem, 3, &q, addresses).err().unwrap();
            assert!(
                matches!(
                    err,
                    FrontendError::Ring {
                        queue: 3,
                        ring: "used ring",
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert_eq!(host_address(&mem, 16 << 20, 1), None);
        assert_eq!(host_address(&mem, 0, 16 << 20), Some(base));
    }
}
