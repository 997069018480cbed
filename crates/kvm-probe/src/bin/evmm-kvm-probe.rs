//! `evmm-kvm-probe`: report whether this host's /dev/kvm runs guest ring-0
//! code natively or emulates it (as PVM does).
//!
//! Prints one line (or, with `--json`, one JSON object) and exits 0; on
//! failure prints `error: ...` to stderr and exits 1.

use std::process::ExitCode;

use clap::Parser;
use evmm_kvm_probe::{probe, MAX_ITERATIONS};

/// Probe /dev/kvm: time a `dec rcx; jnz` guest loop at CPL 0 and CPL 3 and
/// say whether ring 0 is emulated.
#[derive(Debug, Parser)]
#[command(name = "evmm-kvm-probe", version)]
struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    /// Loop iterations N for each CPL (runs of N and 2N are timed);
    /// calibrated to ~20 ms per run if not given.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_ITERATIONS))]
    iterations: Option<u64>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();

    let report = match probe(args.iterations) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("error: cannot serialise the report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("{report}");
    }
    ExitCode::SUCCESS
}
