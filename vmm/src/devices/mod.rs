//! The legacy devices evmm emulates on the port I/O bus (serial, i8042, the ACPI sleep
//! register, the exit device), and the buses that route vCPU exits to devices.

pub mod acpi_pm;
pub mod bus;
pub mod exit_port;
pub mod i8042;
pub mod serial;
