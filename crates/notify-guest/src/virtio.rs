//! A minimal virtio-blk driver over virtio-mmio version 2: one split queue,
//! one request in flight, requests built in static guest memory (identity
//! mapped, so guest-virtual = guest-physical).
//!
//! Features: only `VIRTIO_F_VERSION_1` is negotiated (no `EVENT_IDX`). As Linux's
//! driver does without EVENT_IDX, a request kicks only when the device has not set
//! `VIRTQ_USED_F_NO_NOTIFY` in `used.flags` (read after a full barrier, once the
//! available index is published): a polling device that turned kicks off gets none.
//! With `avail.flags` = 0 every completion interrupts; poll series set
//! `VIRTQ_AVAIL_F_NO_INTERRUPT` instead.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use crate::{irq_count, irq_tsc, mmio_read, mmio_write, LAPIC_BASE, LAPIC_TPR, TPR_BLOCK_ALL};

/// Queue size the driver asks for (or the device maximum if smaller).
pub const QUEUE_SIZE: u16 = 16;

pub(crate) const MAGIC: u32 = 0x7472_6976; // "virt"
pub(crate) const DEVICE_ID_BLOCK: u32 = 2;

// Register offsets (virtio-mmio, version 2).
pub(crate) const REG_MAGIC: usize = 0x000;
pub(crate) const REG_VERSION: usize = 0x004;
pub(crate) const REG_DEVICE_ID: usize = 0x008;
pub(crate) const REG_DEVICE_FEATURES: usize = 0x010;
pub(crate) const REG_DEVICE_FEATURES_SEL: usize = 0x014;
pub(crate) const REG_DRIVER_FEATURES: usize = 0x020;
pub(crate) const REG_DRIVER_FEATURES_SEL: usize = 0x024;
pub(crate) const REG_QUEUE_SEL: usize = 0x030;
pub(crate) const REG_QUEUE_NUM_MAX: usize = 0x034;
pub(crate) const REG_QUEUE_NUM: usize = 0x038;
pub(crate) const REG_QUEUE_READY: usize = 0x044;
pub(crate) const REG_QUEUE_NOTIFY: usize = 0x050;
pub(crate) const REG_INTERRUPT_STATUS: usize = 0x060;
pub(crate) const REG_INTERRUPT_ACK: usize = 0x064;
pub(crate) const REG_STATUS: usize = 0x070;
pub(crate) const REG_QUEUE_DESC_LOW: usize = 0x080;
pub(crate) const REG_QUEUE_DESC_HIGH: usize = 0x084;
pub(crate) const REG_QUEUE_DRIVER_LOW: usize = 0x090;
pub(crate) const REG_QUEUE_DRIVER_HIGH: usize = 0x094;
pub(crate) const REG_QUEUE_DEVICE_LOW: usize = 0x0a0;
pub(crate) const REG_QUEUE_DEVICE_HIGH: usize = 0x0a4;
pub(crate) const REG_CONFIG: usize = 0x100;

// Device status bits.
pub(crate) const STATUS_ACKNOWLEDGE: u32 = 1;
pub(crate) const STATUS_DRIVER: u32 = 2;
pub(crate) const STATUS_DRIVER_OK: u32 = 4;
pub(crate) const STATUS_FEATURES_OK: u32 = 8;
pub(crate) const STATUS_FAILED: u32 = 128;

/// `VIRTIO_F_VERSION_1` is bit 32: bit 0 of the high feature word.
pub(crate) const F_VERSION_1_HIGH: u32 = 1;

pub(crate) const DESC_F_NEXT: u16 = 1;
pub(crate) const DESC_F_WRITE: u16 = 2;
pub(crate) const AVAIL_F_NO_INTERRUPT: u16 = 1;
pub(crate) const USED_F_NO_NOTIFY: u16 = 1;

const BLK_T_IN: u32 = 0;
const BLK_T_GET_ID: u32 = 8;
const BLK_S_OK: u8 = 0;
/// Wait-loop iterations before a request counts as lost (a few seconds of
/// native spinning).
pub const SPIN_LIMIT: u64 = 1 << 32;
/// GET_ID answers are 20 bytes.
const ID_LEN: usize = 20;
const SECTOR_BUF: usize = 4096;

/// A request type the guest issues.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ReqKind {
    /// `VIRTIO_BLK_T_GET_ID` into a 20-byte buffer: no disk I/O.
    GetId,
    /// `VIRTIO_BLK_T_IN` of 4 KiB.
    Read,
}

impl ReqKind {
    /// The name printed in `kind=`.
    pub fn name(self) -> &'static str {
        match self {
            ReqKind::GetId => "get_id",
            ReqKind::Read => "read",
        }
    }
}

/// A split-queue descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Desc {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) flags: u16,
    pub(crate) next: u16,
}

/// The available ring (for queues of up to [`QUEUE_SIZE`]).
#[repr(C)]
pub(crate) struct Avail {
    pub(crate) flags: u16,
    pub(crate) idx: u16,
    pub(crate) ring: [u16; QUEUE_SIZE as usize],
    pub(crate) used_event: u16,
}

/// A used-ring element.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UsedElem {
    pub(crate) id: u32,
    pub(crate) len: u32,
}

/// The used ring (for queues of up to [`QUEUE_SIZE`]).
#[repr(C)]
pub(crate) struct Used {
    pub(crate) flags: u16,
    pub(crate) idx: u16,
    pub(crate) ring: [UsedElem; QUEUE_SIZE as usize],
    pub(crate) avail_event: u16,
}

/// The queue and the request buffers, each part on its own page.
#[repr(C, align(4096))]
struct QueueMem {
    desc: [Desc; QUEUE_SIZE as usize],
    _pad0: [u8; 4096 - 16 * QUEUE_SIZE as usize],
    avail: Avail,
    _pad1: [u8; 4096 - core::mem::size_of::<Avail>()],
    used: Used,
    _pad2: [u8; 4096 - core::mem::size_of::<Used>()],
    data: [u8; SECTOR_BUF],
    header: [u32; 4],
    status: u8,
}

static mut QMEM: QueueMem = QueueMem {
    desc: [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; QUEUE_SIZE as usize],
    _pad0: [0; 4096 - 16 * QUEUE_SIZE as usize],
    avail: Avail {
        flags: 0,
        idx: 0,
        ring: [0; QUEUE_SIZE as usize],
        used_event: 0,
    },
    _pad1: [0; 4096 - core::mem::size_of::<Avail>()],
    used: Used {
        flags: 0,
        idx: 0,
        ring: [UsedElem { id: 0, len: 0 }; QUEUE_SIZE as usize],
        avail_event: 0,
    },
    _pad2: [0; 4096 - core::mem::size_of::<Used>()],
    data: [0; SECTOR_BUF],
    header: [0; 4],
    status: 0,
};

/// The first GET_ID answer, which every later one must equal.
static mut FIRST_ID: [u8; ID_LEN] = [0; ID_LEN];

fn qmem() -> *mut QueueMem {
    addr_of_mut!(QMEM)
}

/// One request's timings (cycles) and outcome.
pub struct Measurement {
    /// Status OK, used element for descriptor 0.
    pub ok: bool,
    /// Poll mode: kick → used.idx seen.
    pub poll: u32,
    /// Poll mode: the QueueNotify write itself (until the next instruction runs).
    pub kick: u32,
    /// Whether the request was kicked (the device had not turned kicks off).
    pub kicked: bool,
    /// Interrupt mode: kick → handler entry.
    pub irq: u32,
    /// Interrupt mode: kick → ring 3 sees the handler ran.
    pub wake: u32,
    /// The completion (or its interrupt) did not come within [`SPIN_LIMIT`]
    /// wait-loop iterations (seconds); the sample is `u32::MAX`.
    pub timeout: bool,
}

/// The identification registers of a virtio-mmio window.
#[derive(Clone, Copy)]
pub struct DeviceIds {
    /// MagicValue ([`MAGIC`] for a virtio-mmio device).
    pub magic: u32,
    /// Version (2: modern virtio-mmio).
    pub version: u32,
    /// DeviceID.
    pub id: u32,
}

/// Reads the identification registers at `base` and prints them
/// (`NOTIFY-DEVICE`); an error if the window is not mapped.
pub fn identify(base: usize) -> Result<DeviceIds, &'static str> {
    if base == 0 || base >= 1 << 32 {
        return Err("device window must be below 4 GiB (only that is mapped)");
    }
    // SAFETY: base is below 4 GiB, inside the identity map; a VMM puts a
    // virtio-mmio window there (per the command line).
    let (magic, version, id) = unsafe {
        (
            mmio_read(base + REG_MAGIC),
            mmio_read(base + REG_VERSION),
            mmio_read(base + REG_DEVICE_ID),
        )
    };
    crate::println!(
        "NOTIFY-DEVICE base={base:#x} magic={magic:#x} version={version} device_id={id}"
    );
    Ok(DeviceIds { magic, version, id })
}

/// Resets a virtio-mmio device (through `rd`/`wr` of its registers), acknowledges
/// it, negotiates `VIRTIO_F_VERSION_1` only and sets FEATURES_OK; returns the status
/// written so far (DRIVER_OK is the caller's, once its queues are set up).
pub(crate) fn negotiate_version_1(
    rd: impl Fn(usize) -> u32,
    wr: impl Fn(usize, u32),
) -> Result<u32, &'static str> {
    wr(REG_STATUS, 0);
    let mut tries = 0;
    while rd(REG_STATUS) != 0 {
        tries += 1;
        if tries > 1000 {
            return Err("device reset did not complete");
        }
    }
    wr(REG_STATUS, STATUS_ACKNOWLEDGE);
    wr(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(REG_DEVICE_FEATURES_SEL, 1);
    if rd(REG_DEVICE_FEATURES) & F_VERSION_1_HIGH == 0 {
        wr(REG_STATUS, STATUS_FAILED);
        return Err("device does not offer VIRTIO_F_VERSION_1");
    }
    wr(REG_DRIVER_FEATURES_SEL, 1);
    wr(REG_DRIVER_FEATURES, F_VERSION_1_HIGH);
    wr(REG_DRIVER_FEATURES_SEL, 0);
    wr(REG_DRIVER_FEATURES, 0);
    let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    wr(REG_STATUS, s);
    if rd(REG_STATUS) & STATUS_FEATURES_OK == 0 {
        wr(REG_STATUS, STATUS_FAILED);
        return Err("device rejected the features (FEATURES_OK not set)");
    }
    Ok(s)
}

/// A virtio-blk device on virtio-mmio.
pub struct BlkDevice {
    base: usize,
    qsize: u16,
    avail_idx: u16,
    used_idx: u16,
    capacity: u64,
}

/// `v` as a u32, saturated.
pub(crate) fn sat(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl BlkDevice {
    /// Checks the registers at `base`: `Ok(None)` if it is not a block
    /// device, an error if it is one this driver cannot drive.
    pub fn probe(base: usize) -> Result<Option<Self>, &'static str> {
        Self::check(base, identify(base)?)
    }

    /// [`Self::probe`] on the registers [`identify`] read.
    pub fn check(base: usize, ids: DeviceIds) -> Result<Option<Self>, &'static str> {
        let DeviceIds { magic, version, id } = ids;
        if magic != MAGIC || id != DEVICE_ID_BLOCK {
            return Ok(None);
        }
        if version != 2 {
            return Err("legacy virtio-mmio (version 1) is not supported (QEMU: -global virtio-mmio.force-legacy=false)");
        }
        Ok(Some(BlkDevice {
            base,
            qsize: QUEUE_SIZE,
            avail_idx: 0,
            used_idx: 0,
            capacity: 0,
        }))
    }

    fn rd(&self, off: usize) -> u32 {
        // SAFETY: `base` was validated by `probe` as a virtio-mmio window.
        unsafe { mmio_read(self.base + off) }
    }

    fn wr(&self, off: usize, v: u32) {
        // SAFETY: as in `rd`.
        unsafe { mmio_write(self.base + off, v) }
    }

    /// Resets the device, negotiates VERSION_1 only, sets up queue 0 and
    /// sets DRIVER_OK.
    pub fn init(&mut self) -> Result<(), &'static str> {
        let s = negotiate_version_1(|off| self.rd(off), |off, v| self.wr(off, v))?;

        self.wr(REG_QUEUE_SEL, 0);
        if self.rd(REG_QUEUE_READY) != 0 {
            return Err("queue 0 already ready after reset");
        }
        let max = self.rd(REG_QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue 0 not available");
        }
        self.qsize = QUEUE_SIZE.min(u16::try_from(max).unwrap_or(u16::MAX));
        // Split rings need a power-of-two size.
        self.qsize = 1 << (15 - self.qsize.leading_zeros());
        if self.qsize < 3 {
            return Err("queue too small for a 3-descriptor chain");
        }
        self.wr(REG_QUEUE_NUM, u32::from(self.qsize));

        let q = qmem();
        // SAFETY: QMEM is used only by this (single) driver instance from
        // ring 3; the device only accesses it after QueueReady / DRIVER_OK.
        let (desc, avail, used) = unsafe {
            let hdr = addr_of!((*q).header) as u64;
            let data = addr_of!((*q).data) as u64;
            let status = addr_of!((*q).status) as u64;
            let d = addr_of_mut!((*q).desc) as *mut Desc;
            write_volatile(
                d,
                Desc {
                    addr: hdr,
                    len: 16,
                    flags: DESC_F_NEXT,
                    next: 1,
                },
            );
            write_volatile(
                d.add(1),
                Desc {
                    addr: data,
                    len: ID_LEN as u32,
                    flags: DESC_F_WRITE | DESC_F_NEXT,
                    next: 2,
                },
            );
            write_volatile(
                d.add(2),
                Desc {
                    addr: status,
                    len: 1,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
            (
                d as u64,
                addr_of!((*q).avail) as u64,
                addr_of!((*q).used) as u64,
            )
        };
        self.wr(REG_QUEUE_DESC_LOW, desc as u32);
        self.wr(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.wr(REG_QUEUE_DRIVER_LOW, avail as u32);
        self.wr(REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.wr(REG_QUEUE_DEVICE_LOW, used as u32);
        self.wr(REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.wr(REG_QUEUE_READY, 1);
        self.wr(REG_STATUS, s | STATUS_DRIVER_OK);
        if self.rd(REG_STATUS) & STATUS_FAILED != 0 {
            return Err("device set FAILED");
        }
        self.capacity = u64::from(self.rd(REG_CONFIG)) | (u64::from(self.rd(REG_CONFIG + 4)) << 32);
        Ok(())
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Reads and acknowledges the interrupt status (an MMIO exit; never
    /// inside a timed interval).
    pub fn ack_interrupt(&self) {
        let isr = self.rd(REG_INTERRUPT_STATUS);
        if isr != 0 {
            self.wr(REG_INTERRUPT_ACK, isr);
        }
    }

    /// The data buffer's first 20 bytes (the last GET_ID answer).
    pub fn id_bytes(&self) -> &'static [u8] {
        // SAFETY: no request is in flight when this is called, so the device
        // does not write the buffer.
        unsafe { &(&*addr_of!(QMEM)).data[..ID_LEN] }
    }

    /// Keeps the current GET_ID answer as the reference.
    pub fn remember_id(&self) {
        // SAFETY: ring-3-only static, no request in flight.
        unsafe { (*addr_of_mut!(FIRST_ID)).copy_from_slice(self.id_bytes()) };
    }

    /// Whether the current GET_ID answer equals the reference.
    pub fn id_matches(&self) -> bool {
        // SAFETY: as above.
        unsafe { *addr_of!(FIRST_ID) == *self.id_bytes() }
    }

    /// Issues one request and waits for it; times it per `irq_mode`.
    pub fn request(&mut self, kind: ReqKind, sector: u64, irq_mode: bool) -> Measurement {
        let q = qmem();
        let (ty, len) = match kind {
            ReqKind::GetId => (BLK_T_GET_ID, ID_LEN as u32),
            ReqKind::Read => (BLK_T_IN, SECTOR_BUF as u32),
        };
        let slot = usize::from(self.avail_idx % self.qsize);
        // SAFETY: no request is in flight (QD1: the previous one completed),
        // so the driver owns the descriptors and buffers; avail is written
        // with volatile stores, the index last (x86 keeps stores in order).
        unsafe {
            write_volatile(addr_of_mut!((*q).header[0]), ty);
            write_volatile(addr_of_mut!((*q).header[1]), 0);
            write_volatile(addr_of_mut!((*q).header[2]), sector as u32);
            write_volatile(addr_of_mut!((*q).header[3]), (sector >> 32) as u32);
            write_volatile(addr_of_mut!((*q).status), 0xff);
            if kind == ReqKind::GetId {
                for i in 0..ID_LEN {
                    write_volatile(addr_of_mut!((*q).data[i]), 0);
                }
            }
            write_volatile(addr_of_mut!((*q).desc[1].len), len);
            write_volatile(
                addr_of_mut!((*q).avail.flags),
                if irq_mode { 0 } else { AVAIL_F_NO_INTERRUPT },
            );
            write_volatile(addr_of_mut!((*q).avail.ring[slot]), 0);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            write_volatile(addr_of_mut!((*q).avail.idx), self.avail_idx);
        }
        let expect = self.used_idx.wrapping_add(1);
        let notify = self.base + REG_QUEUE_NOTIFY;
        // As virtqueue_kick_prepare: the available index is published before the
        // device's flags are read (a full barrier), and the kick is skipped when the
        // device asked for none.
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        // SAFETY: q is QMEM; used.flags is a u16 the device writes.
        let used_flags = unsafe { read_volatile(addr_of!((*q).used.flags)) };
        let skip_kick = u64::from(used_flags & USED_F_NO_NOTIFY != 0);
        // SAFETY: q is QMEM; used.idx is a u16 the device writes.
        let used_idx_ptr = unsafe { addr_of!((*q).used.idx) };
        let mut m = Measurement {
            ok: false,
            poll: 0,
            kick: 0,
            kicked: skip_kick == 0,
            irq: 0,
            wake: 0,
            timeout: false,
        };
        if irq_mode {
            let old = irq_count();
            let start: u64;
            let wake: u64;
            let spin_left: u64;
            // SAFETY: the kick is a 32-bit write to QueueNotify, the TPR is
            // the user-mapped LAPIC register, GUEST_IRQ_COUNT is read-only
            // here. Interrupts are let in only between the two TPR writes,
            // where rax/rdx hold nothing live (the handler clobbers them).
            unsafe {
                core::arch::asm!(
                    "mov dword ptr [{tpr}], 0",
                    "lfence",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "mov {start}, rax",
                    "test {skip}, {skip}",
                    "jnz 4f",
                    "mov dword ptr [{notify}], 0",
                    "4:",
                    "2:",
                    "cmp qword ptr [{cnt}], {old}",
                    "jne 3f",
                    "dec {spin}",
                    "jnz 2b",
                    "3:",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "mov {wake}, rax",
                    "mov dword ptr [{tpr}], {block:e}",
                    tpr = in(reg) LAPIC_BASE + LAPIC_TPR,
                    notify = in(reg) notify,
                    skip = in(reg) skip_kick,
                    cnt = in(reg) addr_of!(crate::boot::GUEST_IRQ_COUNT),
                    old = in(reg) old,
                    block = in(reg) TPR_BLOCK_ALL,
                    spin = inout(reg) SPIN_LIMIT => spin_left,
                    start = out(reg) start,
                    wake = out(reg) wake,
                    out("rax") _,
                    out("rdx") _,
                    options(nostack),
                );
            }
            if spin_left == 0 {
                m.irq = u32::MAX;
                m.wake = u32::MAX;
                m.timeout = true;
            } else {
                // With the kick skipped (a polling device), the completion's
                // interrupt can run between the TPR write and the start TSC:
                // it then took no time after the start, not 2^64 cycles.
                m.irq = sat(irq_tsc().saturating_sub(start));
                m.wake = sat(wake.wrapping_sub(start));
            }
        } else {
            let cycles: u64;
            let kick: u64;
            let spin_left: u64;
            // SAFETY: the kick is a 32-bit write to QueueNotify; used.idx is
            // read-only here.
            unsafe {
                core::arch::asm!(
                    "lfence",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "mov {start}, rax",
                    "test {skip}, {skip}",
                    "jnz 4f",
                    "mov dword ptr [{notify}], 0",
                    "4:",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "sub rax, {start}",
                    "mov {kick}, rax",
                    "2:",
                    "movzx eax, word ptr [{used}]",
                    "cmp eax, {expect:e}",
                    "je 3f",
                    "dec {spin}",
                    "jnz 2b",
                    "3:",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "sub rax, {start}",
                    "mov {cycles}, rax",
                    notify = in(reg) notify,
                    skip = in(reg) skip_kick,
                    used = in(reg) used_idx_ptr,
                    expect = in(reg) u32::from(expect),
                    spin = inout(reg) SPIN_LIMIT => spin_left,
                    start = out(reg) _,
                    kick = out(reg) kick,
                    cycles = out(reg) cycles,
                    out("rax") _,
                    out("rdx") _,
                    options(nostack),
                );
            }
            m.kick = sat(kick);
            m.poll = if spin_left == 0 {
                u32::MAX
            } else {
                sat(cycles)
            };
            m.timeout = spin_left == 0;
        }
        // The interrupt may (in theory) beat the used-ring update's
        // visibility; wait for it.
        let mut spins = 0u64;
        // SAFETY: as above.
        while unsafe { read_volatile(used_idx_ptr) } != expect {
            spins += 1;
            if spins > SPIN_LIMIT {
                m.timeout = true;
                return m;
            }
        }
        self.used_idx = expect;
        let slot = usize::from(self.used_idx.wrapping_sub(1) % self.qsize);
        // SAFETY: the device published this used element before used.idx.
        let (elem, status) = unsafe {
            (
                read_volatile(addr_of!((*q).used.ring[slot])),
                read_volatile(addr_of!((*q).status)),
            )
        };
        m.ok = elem.id == 0 && status == BLK_S_OK;
        m
    }
}
