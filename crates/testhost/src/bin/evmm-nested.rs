//! `evmm-nested [--timeout S] -- COMMAND...`: runs COMMAND inside the nested test host
//! (an L1 Linux with a real KVM under QEMU's emulator), prints its output as it comes
//! and exits with its status. `guest-images/nested` builds what it needs and calls this.

use clap::Parser;
use evmm_testhost::NestedHost;
use std::process::ExitCode;
use std::time::Duration;

/// Run a command inside the nested test host (L1), with the repository's release
/// binaries on PATH and guest-images/out/ at the same path as on this host.
#[derive(Parser)]
#[command(name = "guest-images/nested")]
struct Cli {
    /// Stop the command after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "S")]
    timeout: u64,
    /// L1's memory in MiB.
    #[arg(long, default_value_t = 4096, value_name = "MiB")]
    memory: u32,
    /// L1's vCPUs.
    #[arg(long, default_value_t = 2, value_name = "N")]
    cpus: u32,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let host = NestedHost::new().map(|h| {
        h.timeout(Duration::from_secs(cli.timeout))
            .memory_mib(cli.memory)
            .cpus(cli.cpus)
            .on_line(|line| println!("{line}"))
    });
    match host.and_then(|mut h| h.run(&cli.command)) {
        Ok(out) => {
            log::info!("command exited {} ({})", out.status, out.timing());
            ExitCode::from(u8::try_from(out.status).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("error: {e}");
            if let evmm_testhost::Error::TimedOut { .. } = e {
                return ExitCode::from(124);
            }
            ExitCode::from(125)
        }
    }
}
