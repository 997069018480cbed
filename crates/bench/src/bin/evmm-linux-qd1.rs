//! `evmm-linux-qd1 [--reads N] [--qd32-reads M] [--rounds R] [--disk-mib D]`: 4 KiB
//! O_DIRECT random reads on virtio-blk in Debian's stock guest: latency and IOPS at
//! queue depth 1, IOPS at queue depth 32. Side by side in one run, alternating, same
//! kernel, initramfs, disk file and memory: evmm's in-VMM device (the sync engine, the
//! io_uring engine, and io_uring with adaptive polling), evmm as a vhost-user
//! frontend to `evmm-vhost-user-blk` and to `qemu-storage-daemon`, and QEMU
//! `-M microvm`'s own virtio-blk. Prints a markdown table. It runs itself in the nested
//! test host where this host's /dev/kvm cannot boot Linux (every row in the same L1).

use clap::Parser;
use evmm_testhost::guest::{all_marker_fields, GuestConsole};
use evmm_testhost::process::run_with_limit;
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::bench_main;
use evmm_testhost::{Backend, BackendKind, EvmmGuest, GuestImages, QemuGuest};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Random-read latency and IOPS: evmm's device, evmm + vhost-user backends, QEMU.
#[derive(Parser)]
struct Cli {
    /// QD1 reads per boot.
    #[arg(long, default_value_t = 2000)]
    reads: u32,
    /// QD32 reads per boot.
    #[arg(long, default_value_t = 5000)]
    qd32_reads: u32,
    /// Boots of each VMM.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Size of the disk file in MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
}

/// Longest a boot may take; a guest still running then is reported as hung.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// One row of the table: how the guest's disk is served.
struct Row {
    name: String,
    /// The VMM's command line.
    argv: Vec<String>,
    /// The vhost-user backend evmm connects to, if any.
    backend: Option<BackendKind>,
}

/// The whole run's limit where it goes to the nested host.
const NESTED_LIMIT: Duration = Duration::from_secs(1200);

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(Some(NESTED_LIMIT), || run(&cli))
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let images = GuestImages::existing()?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.img");
    // Not sparse: reads come from the host's page cache, the same for every row.
    std::fs::write(&disk, vec![0x5a; (cli.disk_mib << 20) as usize])?;
    let disk = disk.display().to_string();
    let socket = dir.path().join("blk.sock");
    let test = "blk";
    let args = format!(
        " evmm.args=qd,/dev/vda,1,{},1,+,qd,/dev/vda,32,{},2",
        cli.reads, cli.qd32_reads
    );

    let evmm_with = |extra: Vec<String>| {
        let mut guest = EvmmGuest::new(test);
        guest.cmdline.push_str(&args);
        guest.extra = extra;
        guest.argv(&images)
    };
    let frontend = || {
        evmm_with(vec![
            "--vhost-user-blk".into(),
            format!("socket={}", socket.display()),
        ])
    };
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
    let rows = [
        Row {
            name: "evmm, in-VMM virtio-blk, engine=sync".into(),
            argv: evmm_with(vec!["--disk".into(), format!("path={disk},engine=sync")]),
            backend: None,
        },
        Row {
            name: "evmm, in-VMM virtio-blk, engine=io_uring".into(),
            argv: evmm_with(vec![
                "--disk".into(),
                format!("path={disk},engine=io_uring"),
            ]),
            backend: None,
        },
        Row {
            name: "evmm, in-VMM virtio-blk, engine=io_uring, poll=adaptive".into(),
            argv: evmm_with(vec![
                "--disk".into(),
                format!("path={disk},engine=io_uring,poll=adaptive"),
            ]),
            backend: None,
        },
        Row {
            name: "evmm + evmm-vhost-user-blk".into(),
            argv: frontend(),
            backend: Some(BackendKind::Evmm),
        },
        Row {
            name: "evmm + qemu-storage-daemon".into(),
            argv: frontend(),
            backend: Some(BackendKind::QemuStorageDaemon),
        },
        Row {
            name: format!(
                "QEMU -M microvm (-cpu {}), its virtio-blk",
                kvm_cpu_model()?.model
            ),
            argv: qemu.argv(&images),
            backend: None,
        },
    ];

    let mut results: Vec<Vec<[BTreeMap<String, String>; 2]>> = vec![Vec::new(); rows.len()];
    let mut failures = Vec::new();
    for round in 1..=cli.rounds {
        for (i, row) in rows.iter().enumerate() {
            let _backend = row
                .backend
                .map(|kind| Backend::start(kind, Path::new(&disk), &socket, 1))
                .transpose()?;
            let out = run_with_limit(&row.argv, BOOT_LIMIT)?;
            let console = &out.stdout;
            let failure = match out.status {
                None => Some(format!("still running after {BOOT_LIMIT:?}, killed")),
                Some(s) if !s.success() => Some(format!("ended with {s}")),
                Some(_) if !GuestConsole::parse(console).passed(test) => {
                    Some("the guest test did not pass".to_string())
                }
                Some(_) => None,
            };
            if let Some(why) = failure {
                let tail: Vec<&str> = console.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                eprintln!(
                    "round {round}/{}: {}: FAILED: {why}; the end of its console:\n{}",
                    cli.rounds,
                    row.name,
                    tail.join("\n")
                );
                failures.push(format!("{} (round {round}): {why}", row.name));
                continue;
            }
            let lines = all_marker_fields(console, "EVMM-BLK-QD");
            let depth = |d: &str| {
                lines
                    .iter()
                    .find(|f| f.get("depth").map(String::as_str) == Some(d))
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "{}: no EVMM-BLK-QD depth={d} line; console:\n{console}",
                            row.name
                        )
                    })
            };
            let fields = [depth("1")?, depth("32")?];
            eprintln!(
                "round {round}/{}: {}: QD1 {:?}; QD32 iops={}",
                cli.rounds, row.name, fields[0], fields[1]["iops"]
            );
            results[i].push(fields);
        }
    }
    println!(
        "| Disk served by ({} × {} QD1 and {} QD32 random 4 KiB O_DIRECT reads, {} MiB disk) | QD1 IOPS | p50 µs | p90 µs | p99 µs | p99.9 µs | mean µs | QD32 IOPS |",
        cli.rounds, cli.reads, cli.qd32_reads, cli.disk_mib
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (row, runs) in rows.iter().zip(&results) {
        if runs.is_empty() {
            println!("| {} | no round completed | | | | | | |", row.name);
            continue;
        }
        // The median round by QD1 p50 (and by QD32 IOPS for that column), so one noisy
        // boot does not decide the row.
        let mut qd1: Vec<_> = runs.iter().map(|r| r[0].clone()).collect();
        qd1.sort_by(|a, b| num(a, "p50_us").total_cmp(&num(b, "p50_us")));
        let r = &qd1[qd1.len() / 2];
        let mut qd32: Vec<f64> = runs.iter().map(|r| num(&r[1], "iops")).collect();
        qd32.sort_by(f64::total_cmp);
        println!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
            row.name,
            num(r, "iops"),
            num(r, "p50_us"),
            num(r, "p90_us"),
            num(r, "p99_us"),
            num(r, "p999_us"),
            num(r, "mean_us"),
            qd32[qd32.len() / 2]
        );
    }
    if !failures.is_empty() {
        println!("\nFailed rounds (left out of the table):");
        for f in &failures {
            println!("- {f}");
        }
        return Err(format!("{} round(s) failed", failures.len()).into());
    }
    Ok(())
}

fn num(fields: &BTreeMap<String, String>, key: &str) -> f64 {
    fields
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}
