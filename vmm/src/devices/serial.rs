//! The 8250/16550A UART (COM1) from vm-superio, raising its interrupt
//! through an irqfd.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// A [`Trigger`] that signals an eventfd registered as a KVM irqfd: each
/// trigger is one edge on the GSI.
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        IrqTrigger(evt)
    }

    /// The eventfd, for KVM_IRQFD registration.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 on the port bus: 8 registers, output to `out`.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART that interrupts through `irq` and writes to `out`.
    pub fn new(irq: IrqTrigger, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }

    /// Room in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues received bytes; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial: input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(offset);
        }
    }

    /// Each byte is one write to the register: a `rep outsb` exits once with all of
    /// its bytes for the same port.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        for &value in data {
            if let Err(e) = self.serial.write(offset, value) {
                // Output errors (closed stdout) must not stop the guest.
                log::debug!("serial: write error: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_interrupts() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = IrqTrigger::new(evt.try_clone().unwrap());
        let out = SharedBuf::default();
        let mut dev = SerialDevice::new(irq, Box::new(out.clone()));
        // Enable the THR-empty interrupt (IER bit 1): raises one at once.
        dev.write(1, &[0x02]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut iir = [0u8];
        for b in b"hi\n" {
            // Reading IIR acknowledges the pending THR-empty interrupt.
            dev.read(2, &mut iir);
            assert_eq!(iir[0] & 0x0f, 0x02);
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(evt.read().unwrap(), 3);
        // LSR says THR empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn a_string_write_puts_out_every_byte() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let mut dev = SerialDevice::new(IrqTrigger::new(evt), Box::new(out.clone()));
        // `rep outsb` to the data register: one exit with all of its bytes.
        dev.write(0, b"NOTIFY-DONE\n");
        assert_eq!(&*out.0.lock().unwrap(), b"NOTIFY-DONE\n");
    }

    #[test]
    fn input_is_queued() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            IrqTrigger::new(evt.try_clone().unwrap()),
            Box::new(io::sink()),
        );
        dev.write(1, &[0x01]); // RX data available interrupt
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(evt.read().unwrap(), 1);
        let mut d = [0u8];
        dev.read(0, &mut d);
        assert_eq!(d[0], b'a');
        let cap = dev.input_capacity();
        assert_eq!(dev.enqueue_input(&vec![b'x'; 1000]), cap);
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }
}
