//! The only "firmware" evmm has: a reset vector.
//!
//! Linux on hardware-reduced ACPI without a `reboot=` option picks EFI
//! reboot, finds no EFI and falls back to jumping to the BIOS reset vector
//! (f000:fff0) in real mode. There evmm places a stub that asks the i8042
//! for a reset, so that path ends the VM like `reboot=k` does instead of
//! running off into empty memory.

use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::I8042_PORT;
use crate::vstate::memory::GuestMemoryMmap;

/// Physical address of the x86 reset vector below 1 MiB (f000:fff0).
pub const RESET_VECTOR: u64 = 0xffff0;

/// `mov al, 0xfe; out 0x64, al; hlt; jmp $-3` (16-bit real mode).
pub fn reset_stub() -> [u8; 7] {
    [0xb0, 0xfe, 0xe6, (I8042_PORT + 4) as u8, 0xf4, 0xeb, 0xfd]
}

/// Writes the stub at [`RESET_VECTOR`].
pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&reset_stub(), GuestAddress(RESET_VECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;

    #[test]
    fn stub_fits_and_targets_the_i8042() {
        let stub = reset_stub();
        assert!(RESET_VECTOR + stub.len() as u64 <= 0x10_0000);
        assert_eq!(&stub[..4], &[0xb0, 0xfe, 0xe6, 0x64]);
        let ram = GuestRam::new(16 << 20).unwrap();
        write_reset_vector(ram.memory()).unwrap();
        let mut back = [0u8; 7];
        ram.memory()
            .read_slice(&mut back, GuestAddress(RESET_VECTOR))
            .unwrap();
        assert_eq!(back, stub);
    }
}
