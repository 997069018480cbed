//! The virtio-mmio transport on evmm's MMIO bus.
//!
//! Register accesses that KVM does not handle itself (everything except
//! QueueNotify writes matched by an ioeventfd) exit to the vCPU thread, and
//! the bus hands them here with the offset inside the device's window. The
//! transport validates offsets and access sizes itself: a bad access from
//! the guest is ignored (reads return zeros), never a panic.

use evmm_virtio::mmio::MmioTransport;

use crate::bus::BusDevice;

/// An `Arc<Mutex<MmioTransport>>` goes on the bus as is: the device manager
/// keeps a clone of the same `Arc` for the metrics.
impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}
