//! `evmm-kvm-hold`: keeps one empty KVM VM (no irqchip, no vCPU) open until it is
//! killed.
//!
//! The nested test host (L1) starts it before its command. While a VM exists, the
//! kernel's once-per-transition work of KVM is never redone: creating the first VM
//! and destroying the last flip a static key (the preempt notifiers compiled into
//! `__schedule`) and enable or disable virtualization on every CPU by IPI. Flipping a static key rewrites kernel text while the other
//! CPUs run it, and QEMU's emulator, which runs L1, was caught executing a stale
//! `int3` of such a rewrite on one CPU forever while the other waited for its IPI
//! (README, Known problems). With this VM held, a VMM's VMs come and go without
//! any of that. It holds no vCPU: a held vCPU with an in-kernel APIC (which would
//! also pin the APIC's static keys) made L2 guests triple-fault and runs slower.
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
            Ok((kvm, vm))
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
