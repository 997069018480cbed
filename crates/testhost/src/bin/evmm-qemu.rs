//! `evmm-qemu ARGS...`: `qemu-system-x86_64 -cpu MODEL ARGS...` for a guest on KVM, with
//! MODEL the first CPU model QEMU starts with on the KVM where this runs (this host, or
//! the nested host), or `$EVMM_QEMU_CPU`. Prints `evmm-qemu: -cpu MODEL (why)` on
//! stderr first, then becomes QEMU.

use evmm_testhost::qemu_cpu::{kvm_cpu_model, QEMU};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let model = match kvm_cpu_model() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("evmm-qemu: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("evmm-qemu: {model}");
    let err = Command::new(QEMU)
        .arg("-cpu")
        .arg(&model.model)
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!("evmm-qemu: error: cannot run {QEMU}: {err}");
    ExitCode::FAILURE
}
