//! Where the chaos guest's memory is, and which addresses it may hand the
//! device.
//!
//! The rule that keeps the guest alive whatever the device does with what it
//! is told: every descriptor (in a descriptor table or an indirect table) and
//! every used ring points at or above [`Layout::buffers`] (device-writable
//! buffers and free RAM) or outside RAM altogether. The guest's image (code,
//! stack, page tables, IDT) and the ring areas lie below `buffers`, so even a
//! descriptor the device reads half old, half new, with any length, cannot
//! make it write there. Only available rings (which the device only reads)
//! may point anywhere, the guest's own code included.
//!
//! ```text
//! 0x0010_0000        the image (code, data, page tables, IDT, stacks)
//! rings              SLOTS ring areas (descriptors, available, used, indirect)
//! buffers            SLOTS buffer areas, then free RAM up to ram_end
//! ```

use core::ptr::{addr_of, read_volatile};

use super::rng::Rng;

/// One ring area per (device, queue): up to 4 devices with 2 queues each.
pub const SLOTS: usize = 8;
/// Bytes of one ring area: descriptor table, available ring, used ring and
/// an indirect table, 4 KiB each.
pub const RING_AREA: u64 = 0x4000;
/// Offsets in a ring area.
pub const AVAIL_OFF: u64 = 0x1000;
/// The used ring's offset.
pub const USED_OFF: u64 = 0x2000;
/// The indirect table's offset.
pub const INDIRECT_OFF: u64 = 0x3000;
/// Bytes of one buffer area.
pub const BUFFER_AREA: u64 = 0x4_0000;
/// Where the image is loaded (`linker.ld`).
const IMAGE_START: u64 = 0x10_0000;
/// `hvm_start_info` magic.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Start of the 32-bit MMIO hole (evmm's layout).
pub const MMIO_HOLE: u64 = 0xc000_0000;

/// The guest's memory map.
#[derive(Clone, Copy)]
pub struct Layout {
    /// End of RAM below 4 GiB (from the PVH memory map).
    pub ram_end: u64,
    /// End of the image.
    pub image_end: u64,
    /// Start of the ring areas.
    pub rings: u64,
    /// Start of the buffer areas; everything from here to `ram_end` may be
    /// written by the device.
    pub buffers: u64,
}

/// An address chosen for the device, and whether it is a usable one (in RAM,
/// aligned as asked).
#[derive(Clone, Copy)]
pub struct Pick {
    /// The address.
    pub addr: u64,
    /// In RAM where the guest meant it to be.
    pub sane: bool,
}

impl Layout {
    /// Reads the memory map from the PVH start info; `None` if there is none
    /// or the RAM after the image is too small for the areas.
    pub fn detect() -> Option<Layout> {
        // Only the linker symbol's address is used.
        let image_end = addr_of!(crate::boot::guest_image_end) as u64;
        // SAFETY: the start info and its memory map are in identity-mapped
        // guest RAM, written by the VMM before boot and never after; a bad
        // magic means there is none.
        let ram_end = unsafe {
            let si = read_volatile(addr_of!(crate::boot::guest_start_info)) as usize;
            if si == 0 || read_volatile(si as *const u32) != PVH_MAGIC {
                return None;
            }
            let map = read_volatile((si + 40) as *const u64) as usize;
            let n = read_volatile((si + 48) as *const u32) as usize;
            let mut end = 0u64;
            for i in 0..n.min(128) {
                let e = map + 24 * i;
                let (a, len, ty) = (
                    read_volatile(e as *const u64),
                    read_volatile((e + 8) as *const u64),
                    read_volatile((e + 16) as *const u32),
                );
                if ty == 1 && a < MMIO_HOLE {
                    end = end.max((a + len).min(MMIO_HOLE));
                }
            }
            end
        };
        let rings = (image_end + 0xfff) & !0xfff;
        let buffers = rings + SLOTS as u64 * RING_AREA;
        (buffers + SLOTS as u64 * BUFFER_AREA <= ram_end).then_some(Layout {
            ram_end,
            image_end,
            rings,
            buffers,
        })
    }

    /// Ring area of `slot`.
    pub fn ring(&self, slot: usize) -> u64 {
        self.rings + slot as u64 * RING_AREA
    }

    /// Buffer area of `slot`.
    pub fn buffer(&self, slot: usize) -> u64 {
        self.buffers + slot as u64 * BUFFER_AREA
    }

    /// An address outside RAM: past its end, in the MMIO hole, above 4 GiB,
    /// near the top of the address space.
    pub fn outside(&self, rng: &mut Rng) -> u64 {
        match rng.below(5) {
            0 => self.ram_end + rng.below(0x10_0000),
            1 => MMIO_HOLE + rng.below(0x3f00_0000),
            2 => (1 << 32) + rng.below(1 << 40),
            3 => u64::MAX - rng.below(0x2000),
            _ => rng.next() | (1 << 63),
        }
    }

    /// [`Layout::outside`], or just below the end of RAM (so that a buffer
    /// or ring straddles it). Never for tables: their part in RAM would be
    /// free RAM the device may have written.
    pub fn outside_or_straddling(&self, rng: &mut Rng) -> u64 {
        if rng.chance(20) {
            self.ram_end - rng.range(1, 0x40)
        } else {
            self.outside(rng)
        }
    }

    /// Where a descriptor may point: mostly `slot`'s buffer area, sometimes
    /// other buffers or free RAM, sometimes outside RAM; never below
    /// [`Layout::buffers`] (see the module doc).
    pub fn data(&self, rng: &mut Rng, slot: usize, len: u64) -> Pick {
        match rng.weighted(&[80, 8, 12]) {
            0 => {
                let room = BUFFER_AREA.saturating_sub(len.min(BUFFER_AREA));
                let off = if rng.chance(80) {
                    rng.below(room / 512 + 1) * 512
                } else {
                    rng.below(room + 1)
                };
                Pick {
                    addr: self.buffer(slot) + off,
                    sane: true,
                }
            }
            1 => Pick {
                addr: rng.range(self.buffers, self.ram_end),
                sane: true,
            },
            _ => Pick {
                addr: self.outside_or_straddling(rng),
                sane: false,
            },
        }
    }

    /// Where a descriptor table (`misaligned`: the device refuses a
    /// misaligned one) or an indirect table (not misaligned: the device would
    /// read it) may be: its own place (`own`), or outside RAM.
    pub fn table(&self, rng: &mut Rng, own: u64, misaligned: bool) -> Pick {
        match rng.weighted(&[93, 5, if misaligned { 2 } else { 0 }]) {
            0 => Pick {
                addr: own,
                sane: true,
            },
            1 => Pick {
                addr: self.outside(rng) & !0xf,
                sane: false,
            },
            _ => Pick {
                addr: own + rng.range(1, 16),
                sane: false,
            },
        }
    }

    /// Where a used ring may be: its own place, free RAM, outside RAM, or
    /// misaligned.
    pub fn used(&self, rng: &mut Rng, own: u64) -> Pick {
        match rng.weighted(&[93, 3, 2, 2]) {
            0 => Pick {
                addr: own,
                sane: true,
            },
            1 => Pick {
                addr: rng.range(self.buffers, self.ram_end - 0x1000) & !3,
                sane: false,
            },
            2 => Pick {
                addr: self.outside_or_straddling(rng) & !3,
                sane: false,
            },
            _ => Pick {
                addr: own + rng.range(1, 4),
                sane: false,
            },
        }
    }

    /// Where an available ring may be: anywhere, the guest's own image
    /// included (the device only reads it).
    pub fn avail(&self, rng: &mut Rng, own: u64) -> Pick {
        let addr = match rng.weighted(&[90, 3, 2, 2, 2, 1]) {
            0 => {
                return Pick {
                    addr: own,
                    sane: true,
                }
            }
            1 => rng.range(IMAGE_START, self.image_end) & !1,
            2 => rng.below(0x10_0000) & !1,
            3 => rng.range(self.buffers, self.ram_end) & !1,
            4 => self.outside_or_straddling(rng) & !1,
            _ => own + 1,
        };
        Pick { addr, sane: false }
    }
}

impl Layout {
    /// Fills every ring area's descriptor and indirect tables with harmless
    /// descriptors (address [`Layout::buffers`], length 0), so that entries the
    /// guest never wrote obey the module's rule too.
    pub fn init_tables(&self) {
        for slot in 0..SLOTS {
            for table in [self.ring(slot), self.ring(slot) + INDIRECT_OFF] {
                for i in 0..256u64 {
                    let p = table + 16 * i;
                    // SAFETY: the ring areas are guest RAM above the image
                    // (checked against the memory map in `detect`).
                    unsafe {
                        core::ptr::write_volatile(p as *mut u64, self.buffers);
                        core::ptr::write_volatile((p + 8) as *mut u64, 0);
                    }
                }
            }
        }
    }
}
