//! The `evmm` binary: parse the command line, run the VM, map the outcome
//! to an exit status (see `evmm --help`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use evmm::cli::Cli;

/// Environment variable that overrides the KVM device path (for tests).
const KVM_DEVICE_ENV: &str = "EVMM_KVM_DEVICE";

fn init_logging(cli: &Cli) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if let Some(level) = cli.log_level {
        builder.filter_level(level);
    }
    builder.init();
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == "run") {
        return evmm::run_command::main(args);
    }
    let cli = Cli::parse();
    init_logging(&cli);

    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        evmm::terminal::restore();
        default_hook(info);
    }));

    let config = match cli.to_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kvm_device = std::env::var_os(KVM_DEVICE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(evmm::vstate::vm::DEFAULT_KVM_DEVICE));

    match evmm::run(&config, &kvm_device) {
        Ok(reason) if reason.is_error() => {
            eprintln!("error: {reason}");
            ExitCode::FAILURE
        }
        Ok(evmm::vstate::exit::ExitReason::GuestStatus(status)) => {
            log::info!("the guest's exit status: {status}");
            ExitCode::from(status)
        }
        Ok(reason @ evmm::vstate::exit::ExitReason::TripleFault) => {
            // Ended as a reset (exit 0, as QEMU with -no-reboot), but a guest that
            // triple-faults died without a word of its own: say so.
            log::warn!("{reason}");
            ExitCode::SUCCESS
        }
        Ok(reason) => {
            log::info!("{reason}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
