//! Sweeps over addresses nobody claims: MMIO from ring 3, I/O ports through
//! the ring-0 service gate.

use core::ptr::{read_volatile, write_volatile};

use super::mem::{Layout, MMIO_HOLE};
use super::rng::Rng;
use super::Stats;

/// `ud2` service: one port access.
const SVC_PORT: u64 = 0x5052_0003;

/// Ranges of the MMIO hole without devices (evmm's layout): the rest of the
/// virtio-mmio window, up to the IOAPIC, between IOAPIC and LAPIC, above the
/// LAPIC (below KVM's TSS pages).
const HOLES: [(u64, u64); 4] = [
    (MMIO_HOLE + 0x10_0000, 0xfec0_0000),
    (0xfec0_1000, 0xfee0_0000),
    (0xfee0_1000, 0xfef0_0000),
    (0xfef0_0000, 0xfffb_0000),
];

/// `n` accesses of random widths around a random address in an unclaimed
/// range: the unused slots of the virtio-mmio window after the last device
/// (`devices_end`), the holes above, or RAM's end to the MMIO hole.
pub fn mmio(rng: &mut Rng, mem: &Layout, devices_end: u64, n: u64, st: &mut Stats) {
    let (lo, hi) = match rng.below(3) {
        0 => (devices_end, MMIO_HOLE + 0x10_0000),
        1 => rng.pick(&HOLES),
        _ => (mem.ram_end, MMIO_HOLE),
    };
    let mut addr = rng.range(lo, hi) & !7;
    let stride = pick!(rng, [1, 4, 8, 0x1000, rng.range(1, 0x10000)]);
    for _ in 0..n {
        if addr + 8 > hi {
            addr = lo;
        }
        let v = rng.next();
        // SAFETY: `addr` is in the identity map below 4 GiB, in no RAM and no
        // device the guest depends on (not the IOAPIC/LAPIC pages, not a
        // virtio window in use): the access is an exit evmm answers.
        unsafe {
            match (rng.below(4), rng.chance(50)) {
                (0, false) => drop(read_volatile(addr as *const u8)),
                (1, false) => drop(read_volatile(addr as *const u16)),
                (2, false) => drop(read_volatile(addr as *const u32)),
                (_, false) => drop(read_volatile(addr as *const u64)),
                (0, true) => write_volatile(addr as *mut u8, v as u8),
                (1, true) => write_volatile(addr as *mut u16, v as u16),
                (2, true) => write_volatile(addr as *mut u32, v as u32),
                (_, true) => write_volatile(addr as *mut u64, v),
            }
        }
        st.mmio_accesses += 1;
        addr += stride;
    }
}

/// Whether the chaos guest may touch `port` (width `bytes`): never the
/// serial port (its output goes through the service gate), the i8042 (its
/// reset command ends the VM) or evmm's ACPI sleep registers (power-off).
fn port_allowed(port: u16, bytes: u16) -> bool {
    let (lo, hi) = (u32::from(port), u32::from(port) + u32::from(bytes));
    let hits = |a: u32, b: u32| lo < b && a < hi;
    !(hits(0x3f8, 0x400) || hits(0x60, 0x65) || hits(0x600, 0x608) || hi > 0x1_0000)
}

/// `n` port accesses around a random port.
pub fn ports(rng: &mut Rng, n: u64, st: &mut Stats) {
    let mut port = pick!(
        rng,
        [
            rng.below(0x400),
            rng.below(0x1_0000),
            0x500 + rng.below(0x200)
        ]
    ) as u16;
    for _ in 0..n {
        let op = rng.below(6);
        let bytes = [1, 2, 4][(op % 3) as usize];
        if port_allowed(port, bytes) {
            port_access(port, op, rng.next() as u32);
            st.port_accesses += 1;
        }
        port = port.wrapping_add(rng.range(1, 5) as u16);
    }
}

/// `op` 0/1/2: in byte/word/dword, 3/4/5: out of `v`, at `port`.
fn port_access(port: u16, op: u64, v: u32) {
    let code = if op < 3 { op } else { op + 1 };
    // SAFETY: `ud2` with rax = SVC_PORT makes `guest_syscall_entry` do one
    // `in`/`out` at `dx` (never a port `port_allowed` refuses) and resume
    // after the `ud2`; it clobbers rax only.
    unsafe {
        core::arch::asm!(
            "ud2",
            inout("rax") SVC_PORT => _,
            in("rdx") u64::from(port),
            in("rcx") code,
            in("rsi") u64::from(v),
        );
    }
}
