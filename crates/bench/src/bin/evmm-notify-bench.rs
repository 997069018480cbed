//! `evmm-notify-bench [--guest notify-guest.elf] [--requests N] [--out DIR]`: the
//! notify-latency benchmark. Runs the notify guest (crates/notify-guest, built here
//! unless `--guest` names one) under evmm (ioeventfd + irqfd; and again with the
//! disk worker polling the ring, with the guest's kicks off, for a fixed 30 µs window
//! and for an adaptive one), evmm `--notify exit`, evmm as a vhost-user frontend to
//! `evmm-vhost-user-blk` (its queue thread sleeping on the kick, and polling
//! adaptively) and to `qemu-storage-daemon` (the kick and call eventfds handed to the
//! backend process) and QEMU `-M microvm`, all on the same disk file, and the raw KVM
//! floor program (ioeventfd → host thread → guest memory or irqfd, and the
//! shared-memory floor without any kick), one after the other in one run; prints a
//! markdown table (p50, p90, p99, p99.9, mean, the ratio to the floor of the same wait
//! and, for polled waits, to the shared-memory floor, in µs; series: poll = kick →
//! used ring seen by polling, kick = the QueueNotify write alone (0 when the device
//! had kicks turned off), irq = kick → interrupt handler, irq_wake = kick → the
//! guest's loop sees the interrupt; the guest's kicks per request) and evmm's counters
//! per request, and writes `notify-latency.json` and a latency histogram
//! `notify-latency.svg` into DIR.
//! The guest measures in its ring 3, which runs natively even where ring 0 is
//! emulated, so this runs on this host's /dev/kvm. benches/notify-latency runs it.

use clap::Parser;
use evmm_bench::notify_run::{guest_elf, TempDisk};
use evmm_testhost::notify_output::{NotifyRun, Stats};
use evmm_testhost::process::run_with_limit;
use evmm_testhost::process::slug;
use evmm_testhost::qemu::notify_guest_microvm_argv;
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::bench_main;
use evmm_testhost::{Backend, BackendKind};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Notify-latency benchmark: every notify path side by side.
#[derive(Parser)]
struct Cli {
    /// The notify guest; default: built from crates/notify-guest.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Requests per series.
    #[arg(long, default_value_t = 10_000)]
    requests: u32,
    /// Where the JSON, the plot, the metrics and the consoles go.
    #[arg(long, default_value = "target/notify-latency")]
    out: PathBuf,
}

/// A path through which the guest's kick travels.
struct NotifyPath {
    name: String,
    argv: Vec<String>,
    metrics: Option<PathBuf>,
    /// The vhost-user backend serving the disk during this run, if any, and the
    /// options it gets beyond [`BackendKind::argv`].
    backend: Option<(BackendKind, Vec<String>)>,
}

#[derive(Serialize)]
struct Row {
    path: String,
    kind: String,
    mode: String,
    stats_us: Stats,
    p50_vs_floor: Option<f64>,
    /// For polled waits: p50 over the shared-memory floor's.
    p50_vs_shm_floor: Option<f64>,
    /// QueueNotify writes per request (the guest skips them while the device polls).
    guest_kicks_per_request: Option<f64>,
}

#[derive(Serialize)]
struct Counters {
    path: String,
    requests: u64,
    kicks_per_request: f64,
    wakeups_per_request: f64,
    interrupts_per_request: f64,
    notify_exits_per_request: f64,
    /// Requests the device found by polling its ring, per request.
    polled_per_request: f64,
    /// Time the device spent polling, per request, µs.
    poll_us_per_request: f64,
}

#[derive(Serialize)]
struct Report {
    requests: u32,
    tsc_mhz: f64,
    /// The `-cpu` model of the QEMU row.
    qemu_cpu: String,
    /// p50 of the GET_ID kick with `--notify exit` over the same with ioeventfd.
    kick_exit_over_ioeventfd: Option<f64>,
    rows: Vec<Row>,
    counters: Vec<Counters>,
}

const GUEST_ID: &str = "notify-id";
const DISK_MIB: u64 = 64;
/// Longest one path's run may take.
const RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);
/// The fixed polling window of the fixed-window row, µs.
const POLL_FIXED: &str = "30";

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(None, || run(&cli))
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&cli.out)?;
    let guest = guest_elf(cli.guest.as_deref())?;
    // The disk file lives on tmpfs, so reads measure the notify path, not a disk.
    let disk_file = TempDisk::new("evmm-notify-bench", DISK_MIB << 20, &cli.out)?;
    let disk = disk_file.path().to_path_buf();
    let socket = cli.out.join("vhost-user-blk.sock");
    let qemu_cpu = kvm_cpu_model()?;
    eprintln!("QEMU's CPU model: {qemu_cpu}");
    let paths = paths(cli, &guest, &disk, &socket, &qemu_cpu.model);

    let mut runs = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        eprintln!(
            "[{}/{}] {}: {}",
            i + 1,
            paths.len(),
            p.name,
            p.argv.join(" ")
        );
        let _backend = p
            .backend
            .as_ref()
            .map(|(kind, extra)| {
                let mut argv = kind.argv(
                    &disk.display().to_string(),
                    &socket.display().to_string(),
                    1,
                );
                argv.extend(extra.iter().cloned());
                Backend::spawn(*kind, &argv, &socket, None)
            })
            .transpose()?;
        let out = run_with_limit(&p.argv, RUN_LIMIT)?;
        let console = out.stdout;
        std::fs::write(cli.out.join(format!("{}.console", slug(&p.name))), &console)?;
        let status = out.status.ok_or_else(|| {
            format!(
                "{} still running after {RUN_LIMIT:?}, killed; console in {}",
                p.name,
                cli.out.display()
            )
        })?;
        if !status.success() {
            return Err(format!(
                "{} failed ({status}); console in {}",
                p.name,
                cli.out.display()
            )
            .into());
        }
        let run = NotifyRun::parse(&console);
        if run.done != Some(u64::from(cli.requests)) || !run.errors.is_empty() {
            return Err(format!(
                "{} did not complete: {:?}; console in {}",
                p.name,
                run.errors,
                cli.out.display()
            )
            .into());
        }
        runs.push(run);
    }
    let tsc_khz = runs
        .iter()
        .find_map(|r| r.tsc_khz)
        .ok_or("no run reported the TSC frequency")?;
    let tsc_mhz = tsc_khz as f64 / 1000.0;

    let floor = runs.last().expect("the floor runs last");
    let floor_p50 = |mode: &str| {
        floor
            .series("floor", mode)
            .and_then(|s| Stats::of(&s.cycles))
            .map(|s| s.p50)
    };
    let mut rows = Vec::new();
    for (p, run) in paths.iter().zip(&runs) {
        for s in &run.series {
            let Some(stats) = Stats::of(&s.cycles) else {
                continue;
            };
            let polled = s.mode == "poll" || s.mode == "shm";
            rows.push(Row {
                path: p.name.clone(),
                kind: s.kind.clone(),
                mode: s.mode.clone(),
                stats_us: stats.scaled(tsc_mhz),
                p50_vs_floor: floor_p50(&s.mode).map(|f| stats.p50 / f),
                p50_vs_shm_floor: floor_p50("shm").filter(|_| polled).map(|f| stats.p50 / f),
                guest_kicks_per_request: s.kicks.map(|k| k as f64 / s.cycles.len().max(1) as f64),
            });
        }
    }
    let counters = paths
        .iter()
        .filter_map(|p| {
            p.metrics
                .as_ref()
                .map(|m| counters(&p.name, m, cli.requests))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let kick_p50 = |path: &str| {
        rows.iter()
            .find(|r| r.path == path && r.kind == "get_id" && r.mode == "kick")
            .map(|r| r.stats_us.p50)
    };
    let kick_exit_over_ioeventfd = kick_p50("evmm --notify exit, poll=off")
        .zip(kick_p50("evmm ioeventfd + irqfd, poll=off"))
        .map(|(e, i)| e / i);
    let report = Report {
        requests: cli.requests,
        tsc_mhz,
        qemu_cpu: qemu_cpu.model.clone(),
        kick_exit_over_ioeventfd,
        rows,
        counters,
    };
    print_tables(&report);
    std::fs::write(
        cli.out.join("notify-latency.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let svg = cli.out.join("notify-latency.svg");
    plot(&svg, &paths, &runs, tsc_mhz)?;
    eprintln!(
        "wrote {} and {}",
        cli.out.join("notify-latency.json").display(),
        svg.display()
    );
    Ok(())
}

fn paths(cli: &Cli, guest: &Path, disk: &Path, socket: &Path, qemu_cpu: &str) -> Vec<NotifyPath> {
    let guest = guest.display().to_string();
    let disk = disk.display().to_string();
    let requests = format!("notify.requests={}", cli.requests);
    let evmm = |notify: &str, poll: &str| {
        let metrics = cli
            .out
            .join(format!("evmm-{notify}-poll-{poll}.metrics.json"));
        let argv = [
            "evmm",
            "--kernel",
            &guest,
            "--memory",
            "256",
            "--disk",
            &format!("path={disk},id={GUEST_ID},poll={poll}"),
            "--notify",
            notify,
            "--cmdline",
            &requests,
            "--metrics",
            &metrics.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        (argv, Some(metrics))
    };
    let (a, am) = evmm("ioeventfd", "off");
    let (p, pm) = evmm("ioeventfd", POLL_FIXED);
    let (ad, adm) = evmm("ioeventfd", "adaptive");
    let (b, bm) = evmm("exit", "off");
    // The backends' GET_ID answers are their own; the guest reports what it got.
    let frontend: Vec<String> = [
        "evmm",
        "--kernel",
        &guest,
        "--memory",
        "256",
        "--vhost-user-blk",
        &format!("socket={}", socket.display()),
        "--cmdline",
        &requests,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let qemu = notify_guest_microvm_argv(qemu_cpu, &guest, &disk, GUEST_ID, cli.requests, 256);
    let floor = vec![
        "evmm-notify-floor".to_string(),
        "--requests".into(),
        cli.requests.to_string(),
    ];
    let path = |name: String, argv: Vec<String>, metrics, backend| NotifyPath {
        name,
        argv,
        metrics,
        backend,
    };
    vec![
        path("evmm ioeventfd + irqfd, poll=off".into(), a, am, None),
        path(
            format!("evmm ioeventfd + irqfd, poll={POLL_FIXED}"),
            p,
            pm,
            None,
        ),
        path(
            "evmm ioeventfd + irqfd, poll=adaptive (default)".into(),
            ad,
            adm,
            None,
        ),
        path("evmm --notify exit, poll=off".into(), b, bm, None),
        path(
            "evmm + evmm-vhost-user-blk --poll off".into(),
            frontend.clone(),
            None,
            Some((BackendKind::Evmm, vec!["--poll".into(), "off".into()])),
        ),
        path(
            "evmm + evmm-vhost-user-blk --poll adaptive (default)".into(),
            frontend.clone(),
            None,
            Some((BackendKind::Evmm, vec!["--poll".into(), "adaptive".into()])),
        ),
        path(
            "evmm + qemu-storage-daemon".into(),
            frontend,
            None,
            Some((BackendKind::QemuStorageDaemon, vec![])),
        ),
        path(format!("QEMU microvm (-cpu {qemu_cpu})"), qemu, None, None),
        path("raw KVM floor".into(), floor, None, None),
    ]
}

fn counters(
    name: &str,
    metrics: &Path,
    requests: u32,
) -> Result<Counters, Box<dyn std::error::Error>> {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(metrics)?)?;
    let t = &m["devices"][0]["transport"];
    let polling = &t["device"]["polling"];
    let sum = |k: &str| {
        t["device"]["queues"]
            .as_array()
            .map(|qs| qs.iter().filter_map(|q| q[k].as_u64()).sum::<u64>())
            .unwrap_or(0)
    };
    // get_id: a poll series and an irq series; read: the same: 4 series of `requests`.
    let total = 4 * u64::from(requests);
    let per = |v: u64| v as f64 / total as f64;
    Ok(Counters {
        path: name.to_string(),
        requests: total,
        kicks_per_request: per(sum("kicks")),
        wakeups_per_request: per(sum("wakeups")),
        interrupts_per_request: per(sum("interrupts")),
        notify_exits_per_request: per(t["notify_exits"].as_u64().unwrap_or(0)),
        polled_per_request: per(polling["polled_requests"].as_u64().unwrap_or(0)),
        poll_us_per_request: per(polling["poll_ns"].as_u64().unwrap_or(0)) / 1000.0,
    })
}

fn print_tables(r: &Report) {
    println!("Notify latency, {} requests per series, TSC {:.0} MHz, µs (p50 × floor: against the floor's series of the same mode)\n", r.requests, r.tsc_mhz);
    println!("| path | request | wait | p50 | p90 | p99 | p99.9 | mean | p50 × floor | p50 × shm floor | guest kicks/request |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let or_dash = |v: Option<f64>, digits: usize| {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "–".into())
    };
    for row in &r.rows {
        let s = &row.stats_us;
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            row.path,
            row.kind,
            row.mode,
            s.p50,
            s.p90,
            s.p99,
            s.p999,
            s.mean,
            or_dash(row.p50_vs_floor, 2),
            or_dash(row.p50_vs_shm_floor, 1),
            or_dash(row.guest_kicks_per_request, 3)
        );
    }
    if let Some(x) = r.kick_exit_over_ioeventfd {
        println!("\nThe kick itself (QueueNotify write → next guest instruction, GET_ID, p50): an exit to evmm costs {x:.1}× an ioeventfd signal.");
    }
    println!("\n| path | requests | kicks/request | wake-ups/request | interrupts/request | QueueNotify exits/request | found by polling/request | polling µs/request |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for c in &r.counters {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |",
            c.path,
            c.requests,
            c.kicks_per_request,
            c.wakeups_per_request,
            c.interrupts_per_request,
            c.notify_exits_per_request,
            c.polled_per_request,
            c.poll_us_per_request
        );
    }
}

/// Histograms of the kick → interrupt-handler latency of GET_ID (the floor's irq series).
fn plot(
    svg: &Path,
    paths: &[NotifyPath],
    runs: &[NotifyRun],
    tsc_mhz: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let series: Vec<(&str, Vec<f64>)> = paths
        .iter()
        .zip(runs)
        .filter_map(|(p, r)| {
            let s = r
                .series("get_id", "irq")
                .or_else(|| r.series("floor", "irq"))?;
            Some((
                p.name.as_str(),
                s.cycles.iter().map(|&c| c as f64 / tsc_mhz).collect(),
            ))
        })
        .collect();
    evmm_bench::histogram::latency_svg(svg, "GET_ID: kick → interrupt handler", &series)
}
