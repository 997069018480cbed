//! The legacy devices evmm emulates on the port I/O bus (serial, i8042, the ACPI sleep
//! register), and the buses that route vCPU exits to devices.

pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod serial;
