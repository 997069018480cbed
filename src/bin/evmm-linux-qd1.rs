//! `evmm-linux-qd1 [--reads N] [--rounds R] [--disk-mib M]`: QD1 4 KiB O_DIRECT
//! random-read latency and IOPS of virtio-blk in Debian's stock guest, evmm against
//! QEMU `-M microvm` (same kernel, initramfs, disk file and memory), alternating, one
//! run; prints a markdown table. Run it where Linux guests boot (benches/linux-qd1
//! picks the route).

use clap::Parser;
use evmm_testhost::guest::{marker_fields, GuestConsole};
use evmm_testhost::{EvmmGuest, GuestImages, QemuGuest};
use std::collections::BTreeMap;
use std::process::{Command, ExitCode, Stdio};

/// QD1 random-read latency, evmm vs. QEMU microvm.
#[derive(Parser)]
struct Cli {
    /// Reads per boot.
    #[arg(long, default_value_t = 5000)]
    reads: u32,
    /// Boots of each VMM.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Size of the disk file in MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
}

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let images = GuestImages::existing()?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.img");
    // Not sparse: reads come from the host's page cache, the same for both VMMs.
    std::fs::write(&disk, vec![0x5a; (cli.disk_mib << 20) as usize])?;
    let disk = disk.display().to_string();
    let test = "blk";
    let args = format!(" evmm.args=qd1,/dev/vda,{},1", cli.reads);

    let mut evmm = EvmmGuest::new(test);
    evmm.cmdline.push_str(&args);
    evmm.extra = vec!["--disk".into(), format!("path={disk}")];
    let mut qemu = QemuGuest::microvm(test);
    qemu.cmdline.push_str(&args);
    qemu.extra = [
        "-drive",
        &format!("id=a,file={disk},format=raw,if=none"),
        "-device",
        "virtio-blk-device,drive=a",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let vmms = [
        ("evmm", evmm.argv(&images)),
        ("QEMU -M microvm", qemu.argv(&images)),
    ];

    let mut results: Vec<Vec<BTreeMap<String, String>>> = vec![Vec::new(), Vec::new()];
    for round in 1..=cli.rounds {
        for (i, (name, argv)) in vmms.iter().enumerate() {
            let out = Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()?;
            let console = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() || !GuestConsole::parse(&console).passed(test) {
                return Err(format!(
                    "{name} run {round} failed ({}); console:\n{console}",
                    out.status
                )
                .into());
            }
            let fields = console
                .lines()
                .find_map(|l| marker_fields(l, "EVMM-BLK-QD1"))
                .ok_or_else(|| format!("{name}: no EVMM-BLK-QD1 line; console:\n{console}"))?;
            eprintln!("round {round}/{}: {name}: {fields:?}", cli.rounds);
            results[i].push(fields);
        }
    }
    println!(
        "| VMM ({} × {} random 4 KiB O_DIRECT reads, QD1, {} MiB disk) | IOPS | p50 µs | p90 µs | p99 µs | p99.9 µs | mean µs |",
        cli.rounds, cli.reads, cli.disk_mib
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for ((name, _), runs) in vmms.iter().zip(&results) {
        // The median round by p50, so one noisy boot does not decide the row.
        let mut runs = runs.clone();
        runs.sort_by(|a, b| num(a, "p50_us").total_cmp(&num(b, "p50_us")));
        let r = &runs[runs.len() / 2];
        println!(
            "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            num(r, "iops"),
            num(r, "p50_us"),
            num(r, "p90_us"),
            num(r, "p99_us"),
            num(r, "p999_us"),
            num(r, "mean_us")
        );
    }
    Ok(())
}

fn num(fields: &BTreeMap<String, String>, key: &str) -> f64 {
    fields
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}
