//! `evmm-kvm-hold`: keeps one idle KVM VM (an in-kernel irqchip and one vCPU that
//! never runs) open until it is killed.
//!
//! The nested test host (L1) starts it before its command. While a VM exists, the
//! kernel's once-per-transition work of KVM is never redone: creating the first VM
//! and destroying the last flip static keys (the preempt notifiers compiled into
//! `__schedule`, the in-kernel APIC's) and enable or disable virtualization on
//! every CPU by IPI. Flipping a static key rewrites kernel text while the other
//! CPUs run it, and QEMU's emulator, which runs L1, was caught executing a stale
//! `int3` of such a rewrite on one CPU forever while the other waited for its IPI
//! (README, Known problems). With this VM held, a VMM's VMs come and go without
//! any of that.
//!
//! Prints `evmm-kvm-hold: holding a VM` on stderr once set up; on failure prints
//! `error: ...` and exits 1.

use std::process::ExitCode;

use kvm_ioctls::Kvm;

fn main() -> ExitCode {
    let held = Kvm::new()
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))
        .and_then(|kvm| {
            let vm = kvm
                .create_vm()
                .map_err(|e| format!("cannot create a VM: {e}"))?;
            vm.create_irq_chip()
                .map_err(|e| format!("cannot create the in-kernel irqchip: {e}"))?;
            let vcpu = vm
                .create_vcpu(0)
                .map_err(|e| format!("cannot create a vCPU: {e}"))?;
            Ok((kvm, vm, vcpu))
        });
    let _held = match held {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("evmm-kvm-hold: holding a VM");
    loop {
        // SAFETY: pause(2) only waits for a signal; the default action of the
        // signals that end this program terminates it.
        unsafe { libc::pause() };
    }
}
