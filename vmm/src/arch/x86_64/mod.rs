//! x86-64: one file per piece of the machine the guest is given.

pub mod acpi;
pub mod bios;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
