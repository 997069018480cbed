//! The x86-64 set-up of a VM: guest-physical layout, CPUID, MSRs, boot registers and
//! the firmware tables (MP table, ACPI, the BIOS data the kernel looks for).

mod x86_64;

pub use self::x86_64::{acpi, bios, cpuid, layout, mptable, msr, regs};
