//! Legacy platform devices the VMM emulates on the port I/O bus.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;
