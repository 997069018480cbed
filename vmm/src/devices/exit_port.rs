//! The exit device (`--exit-device`): one I/O port, [`EXIT_PORT`]; a guest that writes
//! byte N to it stops the VM, and evmm exits with status N. A guest test's result thus
//! becomes evmm's exit status without parsing the console. From a Linux guest's shell:
//! `printf '\007' | dd of=/dev/port bs=1 seek=244 count=1` exits with 7.
//!
//! Unlike QEMU's isa-debug-exit, which exits with `(N << 1) | 1`, the status is the
//! byte itself, so 0 (success) can be reported too. A wider write uses its first
//! (lowest) byte; reads return 0xff, as from an unclaimed port.

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::vstate::exit::{ExitReason, VmExit};

pub use crate::arch::layout::EXIT_PORT;

/// The exit device's one register.
pub struct ExitPort {
    exit: Arc<VmExit>,
}

impl ExitPort {
    /// A port that stops the VM through `exit` with [`ExitReason::GuestStatus`].
    pub fn new(exit: Arc<VmExit>) -> Self {
        ExitPort { exit }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        if let Some(&status) = data.first() {
            self.exit.request(ExitReason::GuestStatus(status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_written_is_the_status() {
        for status in [0u8, 1, 7, 255] {
            let exit = VmExit::new().unwrap();
            let mut port = ExitPort::new(exit.clone());
            let mut buf = [0u8; 1];
            port.read(0, &mut buf);
            assert_eq!(buf, [0xff]);
            assert!(!exit.is_stopping());
            port.write(0, &[status, 0x55, 0, 0]);
            assert_eq!(exit.reason(), Some(ExitReason::GuestStatus(status)));
        }
    }

    #[test]
    fn the_first_status_wins_and_empty_writes_are_ignored() {
        let exit = VmExit::new().unwrap();
        let mut port = ExitPort::new(exit.clone());
        port.write(0, &[]);
        port.write(1, &[9]);
        assert!(!exit.is_stopping());
        port.write(0, &[3]);
        port.write(0, &[4]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestStatus(3)));
    }
}
