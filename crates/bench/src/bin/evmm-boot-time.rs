//! `evmm-boot-time [--runs N] [--memory MiB] [--cpus N]`: boots Debian's stock kernel
//! with the guest initramfs under evmm and under QEMU `-M microvm` (same kernel,
//! initramfs, memory and guest test), alternating, and prints a markdown table of
//! start → init marker and start → exit. It runs itself in the nested test host where this host's /dev/kvm cannot
//! boot Linux (every row in the same L1).

use clap::Parser;
use evmm_testhost::boottime::{summary, time_boot, BootTiming};
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::bench_main;
use evmm_testhost::{EvmmGuest, GuestImages, QemuGuest};
use std::process::ExitCode;
use std::time::Duration;

/// Compare the boot time of evmm and QEMU microvm.
#[derive(Parser)]
struct Cli {
    /// Boots of each VMM.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
}

/// The whole run's limit where it goes to the nested host.
const NESTED_LIMIT: Duration = Duration::from_secs(1800);

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(Some(NESTED_LIMIT), || run(&cli))
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let images = GuestImages::existing()?;
    let mut evmm = EvmmGuest::new("hello");
    evmm.memory_mib = cli.memory;
    evmm.cpus = cli.cpus;
    let evmm = evmm.argv(&images);
    let mut qemu = QemuGuest::microvm("hello");
    qemu.memory_mib = cli.memory;
    qemu.cpus = cli.cpus;
    let qemu = qemu.argv(&images);
    let qemu_name = format!("QEMU -M microvm (-cpu {})", kvm_cpu_model()?.model);

    let vmms: [(&str, &[String]); 2] = [("evmm", &evmm), (&qemu_name, &qemu)];
    let mut results: Vec<Vec<BootTiming>> = vec![Vec::new(), Vec::new()];
    for run in 1..=cli.runs {
        for (i, (name, argv)) in vmms.iter().enumerate() {
            let t = time_boot(argv)?;
            if t.status != 0 {
                return Err(format!("{name} exited {}; console:\n{}", t.status, t.console).into());
            }
            eprintln!(
                "run {run}/{}: {name}: init marker {:.2} s, exit {:.2} s",
                cli.runs,
                t.to_init.as_secs_f64(),
                t.to_exit.as_secs_f64()
            );
            results[i].push(t);
        }
    }
    println!(
        "| VMM ({} MiB, {} vCPU, {} runs) | start → init marker, median (min–max) | start → exit, median |",
        cli.memory, cli.cpus, cli.runs
    );
    println!("| --- | --- | --- |");
    for ((name, _), runs) in vmms.iter().zip(&results) {
        let init: Vec<Duration> = runs.iter().map(|t| t.to_init).collect();
        let exit: Vec<Duration> = runs.iter().map(|t| t.to_exit).collect();
        let (m, lo, hi) = summary(&init);
        let (e, _, _) = summary(&exit);
        println!("| {name} | {m:.2} s ({lo:.2}–{hi:.2}) | {e:.2} s |");
    }
    Ok(())
}
