//! One virtio-mmio window as the chaos guest drives it: register writes and
//! reads (plausible and arbitrary), bring-ups, chains and kicks, resets.

use core::ptr::{read_volatile, write_volatile};

use super::chain;
use super::mem::{Layout, Pick, AVAIL_OFF, USED_OFF};
use super::rng::Rng;
use super::Stats;
use crate::virtio::*;

/// Queues driven per device (evmm's disks have 1 or `queues=N`).
pub const QUEUES: usize = 2;
/// `VIRTIO_F_VERSION_1` in the high feature word.
const VERSION_1_HIGH: u32 = 1;
/// QueueNotify, ConfigGeneration.
const REG_CONFIG_GENERATION: usize = 0x0fc;

/// What the guest believes about one queue.
#[derive(Clone, Copy, Default)]
struct QueueState {
    /// Its ring area.
    ring: u64,
    /// Size set (0: not set since the last reset).
    size: u16,
    /// Next available index the guest publishes.
    avail_idx: u16,
    /// Next free descriptor.
    next_desc: u16,
    /// The descriptor table is the ring area's (so chains written there count).
    desc_own: bool,
}

/// A virtio-blk device behind a virtio-mmio window.
pub struct Device {
    base: usize,
    /// First ring-area slot of this device.
    slot: usize,
    capacity: u64,
    features: u64,
    queues: [QueueState; QUEUES],
}

impl Device {
    /// The device at `base` (a virtio-mmio window evmm announced), using
    /// ring-area slots `slot..slot + QUEUES`.
    pub fn new(base: usize, slot: usize, mem: &Layout) -> Self {
        let mut d = Device {
            base,
            slot,
            capacity: 0,
            features: 0,
            queues: [QueueState::default(); QUEUES],
        };
        for (i, q) in d.queues.iter_mut().enumerate() {
            q.ring = mem.ring(slot + i);
        }
        d.capacity = u64::from(d.rd(REG_CONFIG)) | (u64::from(d.rd(REG_CONFIG + 4)) << 32);
        d.wr(REG_DEVICE_FEATURES_SEL, 0);
        let lo = d.rd(REG_DEVICE_FEATURES);
        d.wr(REG_DEVICE_FEATURES_SEL, 1);
        d.features = u64::from(lo) | (u64::from(d.rd(REG_DEVICE_FEATURES)) << 32);
        d.reset();
        d
    }

    /// Disk size in sectors, features offered.
    pub fn info(&self) -> (u64, u64) {
        (self.capacity, self.features)
    }

    /// The window's address and the device's first ring-area slot.
    pub fn place(&self) -> (usize, usize) {
        (self.base, self.slot)
    }

    fn rd(&self, off: usize) -> u32 {
        // SAFETY: `base` is a virtio-mmio window from the command line, below
        // 4 GiB (identity-mapped, uncached); `off` is inside its 4 KiB.
        unsafe { read_volatile((self.base + off) as *const u32) }
    }

    fn wr(&self, off: usize, v: u32) {
        // SAFETY: as in `rd`.
        unsafe { write_volatile((self.base + off) as *mut u32, v) }
    }

    /// Status 0, then every queue's rings back in its ring area (so a queue
    /// never runs on the reset value 0, low memory the guest does not control).
    pub fn reset(&mut self) {
        self.wr(REG_STATUS, 0);
        for i in 0..QUEUES {
            super::ap::note_reset(self.slot + i);
            self.queues[i] = QueueState {
                ring: self.queues[i].ring,
                ..QueueState::default()
            };
            self.own_rings(i);
            self.queues[i].desc_own = false;
        }
    }

    /// The driver's side of the initialization, with some steps skipped,
    /// repeated or wrong, and rings placed by [`Layout`]'s pickers.
    /// With `clean`, nothing is skipped or wrong and the rings are the
    /// queues' own.
    pub fn bring_up(&mut self, rng: &mut Rng, mem: &Layout, st: &mut Stats, clean: bool) {
        self.reset();
        st.resets += 1;
        let dirt = if clean { 0 } else { 100 };
        let mut s = STATUS_ACKNOWLEDGE;
        self.status(rng, s, clean);
        s |= STATUS_DRIVER;
        self.status(rng, s, clean);
        let acked = match rng.weighted(&[70, 15, 10 * dirt, 5 * dirt]) {
            0 => self.features & (rng.next() | (u64::from(VERSION_1_HIGH) << 32)),
            1 => self.features,
            2 => self.features & !(u64::from(VERSION_1_HIGH) << 32),
            _ => rng.next(),
        };
        self.wr(REG_DRIVER_FEATURES_SEL, 0);
        self.wr(REG_DRIVER_FEATURES, acked as u32);
        self.wr(REG_DRIVER_FEATURES_SEL, 1);
        self.wr(REG_DRIVER_FEATURES, (acked >> 32) as u32);
        s |= STATUS_FEATURES_OK;
        self.status(rng, s, clean);
        let _ = self.rd(REG_STATUS);
        for i in 0..QUEUES {
            if !clean && rng.chance(10) {
                continue;
            }
            self.wr(REG_QUEUE_SEL, i as u32);
            let max = self.rd(REG_QUEUE_NUM_MAX);
            if max == 0 {
                continue;
            }
            let size = if clean || rng.chance(85) {
                pick!(rng, [256u32, 128, 64, 16, 8, 4, 2, 1]).min(max)
            } else {
                pick!(rng, [0, 3, 257, 0xffff, max + 1, rng.next() as u32])
            };
            self.wr(REG_QUEUE_NUM, size);
            let q = &mut self.queues[i];
            if size.is_power_of_two() && size <= max.min(256) {
                q.size = size as u16;
                super::ap::note_size(self.slot + i, size as u16);
            }
            if clean {
                self.own_rings(i);
            } else {
                self.place_rings(rng, mem, i);
            }
            // SAFETY: the queue's own avail and used rings (ring area).
            unsafe {
                let r = self.queues[i].ring;
                write_volatile((r + AVAIL_OFF) as *mut u32, 0);
                write_volatile((r + USED_OFF + 2) as *mut u16, 0);
            }
            self.wr(REG_QUEUE_READY, if clean || rng.chance(92) { 1 } else { 2 });
        }
        if clean || rng.chance(95) {
            self.status(rng, s | STATUS_DRIVER_OK, clean);
        }
    }

    /// Whether the device is live: DRIVER_OK, not FAILED, no DEVICE_NEEDS_RESET.
    pub fn live(&self) -> bool {
        self.rd(REG_STATUS)
            == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    }

    /// Points queue `i`'s rings at its ring area.
    fn own_rings(&mut self, i: usize) {
        let ring = self.queues[i].ring;
        self.wr(REG_QUEUE_SEL, i as u32);
        set_addr(self.base, REG_QUEUE_DESC_LOW, ring);
        set_addr(self.base, REG_QUEUE_DRIVER_LOW, ring + AVAIL_OFF);
        set_addr(self.base, REG_QUEUE_DEVICE_LOW, ring + USED_OFF);
        self.queues[i].desc_own = true;
    }

    /// Writes status `s`, or (unless `clean`) now and then an illegal one
    /// first, or nothing.
    fn status(&self, rng: &mut Rng, s: u32, clean: bool) {
        if clean {
            self.wr(REG_STATUS, s);
            return;
        }
        if rng.chance(5) {
            // Never 0 here: a reset must go through `reset`.
            self.wr(
                REG_STATUS,
                pick!(
                    rng,
                    [0x80, 0x40, 0xff, 4, 8, (rng.next() as u32 & 0x7e) | 0x10]
                ),
            );
        }
        if rng.chance(97) {
            self.wr(REG_STATUS, s);
        }
    }

    /// Points queue `i`'s three rings where the pickers say.
    fn place_rings(&mut self, rng: &mut Rng, mem: &Layout, i: usize) {
        let ring = self.queues[i].ring;
        let desc: Pick = mem.table(rng, ring, true);
        let avail = mem.avail(rng, ring + AVAIL_OFF);
        let used = mem.used(rng, ring + USED_OFF);
        self.wr(REG_QUEUE_SEL, i as u32);
        set_addr(self.base, REG_QUEUE_DESC_LOW, desc.addr);
        set_addr(self.base, REG_QUEUE_DRIVER_LOW, avail.addr);
        set_addr(self.base, REG_QUEUE_DEVICE_LOW, used.addr);
        self.queues[i].desc_own = desc.sane;
    }

    /// A plausible register access: a known register, a value that makes
    /// sense for it most of the time.
    pub fn register_op(&mut self, rng: &mut Rng, mem: &Layout, st: &mut Stats) {
        st.registers += 1;
        let q = rng.below(QUEUES as u64 + 1) as u32;
        match rng.below(14) {
            0 => self.wr(
                REG_DEVICE_FEATURES_SEL,
                pick!(rng, [0, 1, 2, rng.next() as u32]),
            ),
            1 => {
                self.wr(REG_DRIVER_FEATURES_SEL, pick!(rng, [0, 1, 2, u32::MAX]));
                self.wr(
                    REG_DRIVER_FEATURES,
                    pick!(
                        rng,
                        [
                            self.features as u32,
                            (self.features >> 32) as u32,
                            u32::MAX,
                            rng.next() as u32
                        ]
                    ),
                );
            }
            2 => self.wr(REG_QUEUE_SEL, pick!(rng, [0, 1, 2, rng.next() as u32])),
            3 => {
                self.wr(REG_QUEUE_SEL, q);
                self.wr(
                    REG_QUEUE_NUM,
                    pick!(rng, [256, 128, 16, 1, 0, 3, 257, 0xffff, rng.next() as u32]),
                );
            }
            4 => {
                self.wr(REG_QUEUE_SEL, q);
                self.wr(REG_QUEUE_READY, pick!(rng, [0, 1, 1, 2, rng.next() as u32]));
            }
            5 => {
                if (q as usize) < QUEUES {
                    self.place_rings(rng, mem, q as usize);
                }
            }
            6 => {
                let v = pick!(
                    rng,
                    [
                        0,
                        1,
                        3,
                        7,
                        11,
                        15,
                        0x80,
                        0x40,
                        0x8f,
                        rng.next() as u32 & 0xff
                    ]
                );
                if v == 0 {
                    self.reset();
                    st.resets += 1;
                } else {
                    self.wr(REG_STATUS, v);
                }
            }
            7 => self.wr(REG_INTERRUPT_ACK, pick!(rng, [1, 2, 3, u32::MAX])),
            8 => self.wr(
                REG_QUEUE_NOTIFY,
                pick!(rng, [0, 1, 2, 0xffff, rng.next() as u32]),
            ),
            9 => {
                // Config space: any width the device takes, any offset.
                let off = REG_CONFIG + rng.below(0x100) as usize;
                self.access(off, pick!(rng, [1, 2, 4, 8]), rng.chance(30), rng.next());
            }
            _ => {
                let reg = pick!(
                    rng,
                    [
                        REG_MAGIC,
                        REG_VERSION,
                        REG_DEVICE_ID,
                        REG_DEVICE_FEATURES,
                        REG_QUEUE_NUM_MAX,
                        REG_QUEUE_READY,
                        REG_INTERRUPT_STATUS,
                        REG_STATUS,
                        REG_CONFIG_GENERATION,
                        REG_QUEUE_DESC_LOW,
                        REG_QUEUE_NOTIFY,
                    ]
                );
                let _ = self.rd(reg);
            }
        }
    }

    /// An access at any offset of the window, any width; 4-byte aligned writes
    /// to the ring address registers are left to [`Device::register_op`] (a
    /// random descriptor table could make the device write the guest's code).
    pub fn arbitrary_op(&mut self, rng: &mut Rng, st: &mut Stats) {
        st.arbitrary += 1;
        let mut off = rng.below(0x1000) as usize;
        let width = pick!(rng, [1, 2, 4, 8]);
        let write = rng.chance(60);
        if write && width == 4 && (REG_QUEUE_DESC_LOW..=REG_QUEUE_DEVICE_HIGH).contains(&(off & !3))
        {
            off |= 1;
        }
        let v = rng.next();
        if write && width == 4 && off == REG_STATUS && v as u32 == 0 {
            // A reset goes through `reset` (rings back where they are safe).
            self.reset();
            st.resets += 1;
            return;
        }
        self.access(off, width, write, v);
    }

    /// One access of `width` bytes at `off`.
    fn access(&self, off: usize, width: u64, write: bool, v: u64) {
        let p = self.base + off.min(0x1000 - width as usize);
        // SAFETY: inside the device's 4 KiB window (see `rd`).
        unsafe {
            match (width, write) {
                (1, false) => drop(read_volatile(p as *const u8)),
                (2, false) => drop(read_volatile(p as *const u16)),
                (4, false) => drop(read_volatile(p as *const u32)),
                (_, false) => drop(read_volatile(p as *const u64)),
                (1, true) => write_volatile(p as *mut u8, v as u8),
                (2, true) => write_volatile(p as *mut u16, v as u16),
                (4, true) => write_volatile(p as *mut u32, v as u32),
                (_, true) => write_volatile(p as *mut u64, v),
            }
        }
    }

    /// Builds 1 to 8 chains in a queue whose descriptor table is its own,
    /// publishes them (now and then with a bad head or index) and kicks.
    /// Returns the queue used, if chains were built.
    pub fn chains_and_kick(
        &mut self,
        rng: &mut Rng,
        mem: &Layout,
        st: &mut Stats,
        max: u64,
    ) -> Option<usize> {
        let mut i = rng.below(QUEUES as u64) as usize;
        if super::ap::owns(self.slot + i) {
            i = (i + 1) % QUEUES;
        }
        let q = self.queues[i];
        if !q.desc_own || q.size == 0 {
            self.kick(rng, i as u32, st);
            return None;
        }
        let mut q = q;
        for _ in 0..rng.range(1, max + 1) {
            let c = chain::random(rng, mem, self.slot + i, self.capacity);
            let (head, used) = c.place(rng, mem, q.ring, q.size, q.next_desc);
            q.next_desc = (q.next_desc + used) % q.size;
            let head = if rng.chance(3) {
                rng.next() as u16
            } else {
                head
            };
            let slot = u64::from(q.avail_idx % q.size);
            // SAFETY: the queue's own available ring (ring area, size <= 256).
            unsafe { write_volatile((q.ring + AVAIL_OFF + 4 + 2 * slot) as *mut u16, head) };
            q.avail_idx = q.avail_idx.wrapping_add(1);
            st.chains += 1;
        }
        if rng.chance(3) {
            q.avail_idx = q
                .avail_idx
                .wrapping_add(pick!(rng, [q.size, 0x8000, rng.next() as u16]));
        }
        // SAFETY: as above; flags (interrupts on or off) and the index.
        unsafe {
            write_volatile((q.ring + AVAIL_OFF) as *mut u16, rng.below(2) as u16);
            write_volatile((q.ring + AVAIL_OFF + 2) as *mut u16, q.avail_idx);
            if rng.chance(50) {
                // used_event (EVENT_IDX), anything.
                write_volatile(
                    (q.ring + AVAIL_OFF + 4 + 2 * u64::from(q.size)) as *mut u16,
                    rng.next() as u16,
                );
            }
        }
        self.queues[i] = q;
        self.kick(rng, i as u32, st);
        Some(i)
    }

    /// QueueNotify for `queue` (now and then another value).
    pub fn kick(&self, rng: &mut Rng, queue: u32, st: &mut Stats) {
        st.notifies += 1;
        let v = if rng.chance(90) {
            queue
        } else {
            pick!(rng, [2, 0xffff, rng.next() as u32])
        };
        self.wr(REG_QUEUE_NOTIFY, v);
    }

    /// Spins up to `spins` times for queue `i`'s used index to move; returns
    /// how far it moved.
    pub fn wait_used(&self, i: usize, spins: u64) -> u16 {
        let p = (self.queues[i].ring + USED_OFF + 2) as *const u16;
        // SAFETY: the queue's own used ring (ring area).
        let start = unsafe { read_volatile(p) };
        for _ in 0..spins {
            // SAFETY: as above.
            if unsafe { read_volatile(p) } != start {
                break;
            }
            core::hint::spin_loop();
        }
        // SAFETY: as above.
        unsafe { read_volatile(p) }.wrapping_sub(start)
    }

    /// Reads and acknowledges InterruptStatus.
    pub fn ack(&self) {
        let isr = self.rd(REG_INTERRUPT_STATUS);
        self.wr(REG_INTERRUPT_ACK, isr);
    }
}

/// Writes a 64-bit queue address register pair (low half first or last).
fn set_addr(base: usize, low: usize, addr: u64) {
    // SAFETY: `low` and `low + 4` are registers of the window at `base`.
    unsafe {
        write_volatile((base + low) as *mut u32, addr as u32);
        write_volatile((base + low + 4) as *mut u32, (addr >> 32) as u32);
    }
}
