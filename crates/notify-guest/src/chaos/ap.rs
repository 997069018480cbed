//! The second vCPU (the AP): started by INIT/SIPI through the trampoline in
//! `boot`, it publishes chains and kicks on one queue of its own while the
//! boot vCPU goes on with everything else (resets of that device included).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering::SeqCst};

use super::chain;
use super::mem::{Layout, AVAIL_OFF, SLOTS, USED_OFF};
use super::rng::Rng;
use crate::virtio::REG_QUEUE_NOTIFY;

/// Where the trampoline is copied (SIPI vector 0x10: 0x10000).
const AP_TRAMP_BASE: usize = 0x10000;
const SIPI_VECTOR: u32 = (AP_TRAMP_BASE >> 12) as u32;
const LAPIC_ICR_LOW: usize = crate::LAPIC_BASE + 0x300;
const LAPIC_ICR_HIGH: usize = crate::LAPIC_BASE + 0x310;
/// Fixed destination APIC id of the AP.
const AP_APIC_ID: u32 = 1;

/// What the AP works with, written before it is started.
#[derive(Clone, Copy)]
pub struct ApConfig {
    /// The memory map.
    pub mem: Layout,
    /// The virtio-mmio window of its device.
    pub base: usize,
    /// Its queue on that device.
    pub queue: u32,
    /// The ring-area slot of that queue.
    pub slot: usize,
    /// The disk's size in sectors.
    pub capacity: u64,
    /// Its generator's seed.
    pub seed: u64,
}

static mut AP_CONFIG: Option<ApConfig> = None;
static STARTED: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);
static DONE: AtomicBool = AtomicBool::new(false);
/// Chains the AP published, kicks it wrote.
pub static CHAINS: AtomicU64 = AtomicU64::new(0);
/// QueueNotify writes by the AP.
pub static NOTIFIES: AtomicU64 = AtomicU64::new(0);
/// The slot the AP owns (`usize::MAX`: none).
static SLOT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Per slot: bumped at every reset of the queue's device.
static GENERATION: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
/// Per slot: the queue size the last bring-up set (0: none).
static SIZE: [AtomicU16; SLOTS] = [const { AtomicU16::new(0) }; SLOTS];

/// Whether the AP publishes on `slot` (the boot vCPU then leaves it alone).
pub fn owns(slot: usize) -> bool {
    SLOT.load(SeqCst) == slot
}

/// The boot vCPU reset the device of `slot`.
pub fn note_reset(slot: usize) {
    GENERATION[slot].fetch_add(1, SeqCst);
    SIZE[slot].store(0, SeqCst);
}

/// The boot vCPU set `slot`'s queue size to `size`.
pub fn note_size(slot: usize, size: u16) {
    SIZE[slot].store(size, SeqCst);
}

/// Starts the AP with `cfg`; false if it did not come up (one vCPU).
pub fn start(cfg: ApConfig) -> bool {
    // SAFETY: the AP reads AP_CONFIG only after the SIPI below; nothing else
    // writes it.
    unsafe { *addr_of_mut!(AP_CONFIG) = Some(cfg) };
    SLOT.store(cfg.slot, SeqCst);
    let from = addr_of!(crate::boot::guest_ap_tramp) as usize;
    let len = addr_of!(crate::boot::guest_ap_tramp_end) as usize - from;
    // SAFETY: the trampoline is code in the image; AP_TRAMP_BASE is RAM below
    // 1 MiB that nothing else uses after boot (the device is never told to
    // write below `Layout::buffers`). The LAPIC page is identity-mapped and
    // user-accessible; ICR writes send INIT, then SIPI twice (as the MP
    // specification does) to APIC id 1.
    unsafe {
        for i in 0..len {
            write_volatile(
                (AP_TRAMP_BASE + i) as *mut u8,
                read_volatile((from + i) as *const u8),
            );
        }
        write_volatile(LAPIC_ICR_HIGH as *mut u32, AP_APIC_ID << 24);
        write_volatile(LAPIC_ICR_LOW as *mut u32, 0x4500);
        spin(1 << 20);
        for _ in 0..2 {
            write_volatile(LAPIC_ICR_HIGH as *mut u32, AP_APIC_ID << 24);
            write_volatile(LAPIC_ICR_LOW as *mut u32, 0x4600 | SIPI_VECTOR);
            spin(1 << 20);
        }
    }
    for _ in 0..(1u64 << 27) {
        if STARTED.load(SeqCst) {
            return true;
        }
        core::hint::spin_loop();
    }
    SLOT.store(usize::MAX, SeqCst);
    false
}

/// Tells the AP to stop and waits (bounded) until it idles.
pub fn stop() -> bool {
    STOP.store(true, SeqCst);
    for _ in 0..(1u64 << 32) {
        if DONE.load(SeqCst) {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

fn spin(n: u64) {
    for _ in 0..n {
        core::hint::spin_loop();
    }
}

/// Ring 3 on the AP, from `boot`'s `ap_user_entry`.
#[no_mangle]
pub extern "C" fn guest_ap_main() -> ! {
    // SAFETY: written before the SIPI that started this vCPU, never after.
    let cfg = unsafe { *addr_of!(AP_CONFIG) };
    STARTED.store(true, SeqCst);
    let Some(cfg) = cfg else { super::idle() };
    let mut rng = Rng::new(cfg.seed ^ 0x5bd1_e995_0000_0001);
    let ring = cfg.mem.ring(cfg.slot);
    let (mut generation, mut avail_idx, mut next) = (u64::MAX, 0u16, 0u16);
    while !STOP.load(SeqCst) {
        let g = GENERATION[cfg.slot].load(SeqCst);
        if g != generation {
            (generation, avail_idx, next) = (g, 0, 0);
        }
        let size = SIZE[cfg.slot].load(SeqCst).min(256);
        // SAFETY: the queue's own used ring (ring area); the device writes it.
        let used_idx = unsafe { read_volatile((ring + USED_OFF + 2) as *const u16) };
        // Mostly no more chains in flight than the ring holds.
        let room = size.saturating_sub(avail_idx.wrapping_sub(used_idx));
        let batch = if rng.chance(97) {
            u64::from(room).min(4)
        } else {
            4
        };
        if size > 0 && batch > 0 {
            for _ in 0..rng.range(1, batch + 1) {
                let c = chain::random(&mut rng, &cfg.mem, cfg.slot, cfg.capacity);
                let (head, used) = c.place(&mut rng, &cfg.mem, ring, size, next);
                next = (next + used) % size;
                let at = ring + AVAIL_OFF + 4 + 2 * u64::from(avail_idx % size);
                // SAFETY: the queue's own available ring (ring area, size <= 256).
                unsafe { write_volatile(at as *mut u16, head) };
                avail_idx = avail_idx.wrapping_add(1);
                CHAINS.fetch_add(1, SeqCst);
            }
            // SAFETY: as above.
            unsafe { write_volatile((ring + AVAIL_OFF + 2) as *mut u16, avail_idx) };
        }
        // SAFETY: QueueNotify of the AP's device window (identity-mapped MMIO).
        unsafe { write_volatile((cfg.base + REG_QUEUE_NOTIFY) as *mut u32, cfg.queue) };
        NOTIFIES.fetch_add(1, SeqCst);
        spin(rng.below(20_000));
    }
    DONE.store(true, SeqCst);
    super::idle()
}
