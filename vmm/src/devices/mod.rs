//! Devices the VMM emulates: the legacy platform devices on the port I/O
//! bus, and the virtio-mmio transports on the MMIO bus.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;
pub mod virtio_mmio;
