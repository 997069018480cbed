//! evmm: a minimal KVM virtual machine monitor.

pub mod probe;
