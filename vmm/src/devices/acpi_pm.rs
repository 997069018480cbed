//! The hardware-reduced ACPI sleep registers (FADT SLEEP_CONTROL_REG and
//! SLEEP_STATUS_REG): the guest powers off by writing SLP_EN with the S5
//! sleep type from the DSDT's `\_S5_`.

use crate::arch::acpi::S5_SLEEP_TYPE;
use crate::devices::bus::BusDevice;
use crate::vstate::exit::{ExitReason, VmExit};
use std::sync::Arc;

/// SLP_EN bit of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// Position and mask of SLP_TYPx in the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Two byte registers: sleep control at offset 0, sleep status at 1.
pub struct AcpiSleep {
    exit: Arc<VmExit>,
}

impl AcpiSleep {
    /// Registers that stop the VM with [`ExitReason::PowerOff`].
    pub fn new(exit: Arc<VmExit>) -> Self {
        AcpiSleep { exit }
    }
}

/// Decodes a sleep control write: the sleep type, if SLP_EN is set.
pub fn sleep_type(value: u8) -> Option<u8> {
    (value & SLP_EN != 0).then_some((value >> SLP_TYP_SHIFT) & SLP_TYP_MASK)
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        match data.first().copied().and_then(sleep_type) {
            Some(S5_SLEEP_TYPE) => self.exit.request(ExitReason::PowerOff),
            Some(other) => {
                evmm_virtio::guest_warn!("guest asked for unsupported ACPI sleep type {other}")
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode() {
        assert_eq!(sleep_type(0x34), Some(5));
        assert_eq!(sleep_type(0x14), None);
        assert_eq!(sleep_type(0x20), Some(0));
    }

    #[test]
    fn s5_powers_off() {
        let exit = VmExit::new().unwrap();
        let mut dev = AcpiSleep::new(exit.clone());
        dev.write(0, &[(3 << 2) | SLP_EN]);
        assert!(!exit.is_stopping());
        dev.write(1, &[0x34]);
        assert!(!exit.is_stopping());
        dev.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }
}
