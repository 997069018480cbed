//! The i8042 keyboard controller, reduced to what a guest uses to reset the
//! machine: a write of 0xfe to the command port (0x64) ends the VM.

use vm_superio::I8042Device;

use crate::devices::bus::BusDevice;
use crate::vstate::exit::ExitTrigger;

/// The i8042 at ports 0x60..=0x64.
pub struct I8042 {
    inner: I8042Device<ExitTrigger>,
}

impl I8042 {
    /// An i8042 whose reset command fires `reset`.
    pub fn new(reset: ExitTrigger) -> Self {
        I8042 {
            inner: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: no data, input buffer empty, so reset loops do not wait.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // ExitTrigger cannot fail.
            let _ = self.inner.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::exit::{ExitReason, VmExit};

    #[test]
    fn reset_command_stops_the_vm() {
        let exit = VmExit::new().unwrap();
        let mut dev = I8042::new(ExitTrigger::new(exit.clone(), ExitReason::Reset));
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status[0], 0);
        dev.write(4, &[0xd1]);
        dev.write(0, &[0xfe]);
        assert!(!exit.is_stopping());
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
