//! evmm: a minimal KVM virtual machine monitor whose virtio devices are driven by
//! ioeventfds and irqfds.
//!
//! [`run`] takes a validated [`config::VmConfig`], builds the VM
//! ([`vstate::vm::Vm::new`]) and runs it until the guest powers off or resets.
//!
//! * [`cli`] and [`config`]: the command line and what it turns into;
//! * [`arch`]: the x86-64 set-up (layout, CPUID, MSRs, registers, MP and ACPI tables);
//! * [`boot`]: loading the kernel and initramfs, boot parameters;
//! * [`vstate`]: the KVM VM, guest memory, the vCPUs and how a run ends;
//! * [`device_manager`]: virtio devices wired to KVM (the one place a queue's
//!   ioeventfd and a device's irqfd are bound); the devices themselves are in the
//!   `evmm-virtio` crate;
//! * [`devices`]: the legacy devices and the I/O buses;
//! * [`event_loop`], [`signals`], [`terminal`], [`metrics`]: the main thread's loop,
//!   stop signals, the console's terminal, `--metrics`;
//! * [`run_command`]: `evmm run`, a command in a guest with the host's files as its
//!   root (virtiofsd, a generated initramfs, the exit device).

pub mod arch;
pub mod boot;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod eintr;
pub mod error;
pub mod event_loop;
pub mod metrics;
pub mod run_command;
pub mod signals;
pub mod terminal;
pub mod vstate;

pub use error::Error;
pub use vstate::exit::ExitReason;

/// Builds a VM from `config` using the KVM device at `kvm_device` and runs
/// it to the end. A guest-initiated stop is `Ok`, even a triple fault; a
/// vCPU failure is `Ok(ExitReason::Error(..))`.
pub fn run(config: &config::VmConfig, kvm_device: &std::path::Path) -> Result<ExitReason, Error> {
    let vm = vstate::vm::Vm::new(config, kvm_device)?;
    Ok(vm.run()?)
}
