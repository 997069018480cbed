//! evmm: a minimal KVM virtual machine monitor.
//!
//! [`run`] takes a validated [`config::VmConfig`], builds the VM
//! ([`vm::Vm::new`]) and runs it until the guest powers off or resets.

pub mod acpi;
pub mod bios;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod cpuid;
pub mod device_manager;
pub mod devices;
pub mod error;
pub mod event_loop;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod signals;
pub mod terminal;
pub mod vcpu;
pub mod vhost_user;
pub mod vm;

pub use error::Error;
pub use exit::ExitReason;

/// Builds a VM from `config` using the KVM device at `kvm_device` and runs
/// it to the end. A guest-initiated stop is `Ok`, even a triple fault; a
/// vCPU failure is `Ok(ExitReason::Error(..))`.
pub fn run(config: &config::VmConfig, kvm_device: &std::path::Path) -> Result<ExitReason, Error> {
    let vm = vm::Vm::new(config, kvm_device)?;
    Ok(vm.run()?)
}
