//! `evmm-notify-bench [--guest notify-guest.elf] [--requests N] [--out DIR]`: the
//! notify-latency benchmark. Runs the notify guest (crates/notify-guest, built here
//! unless `--guest` names one) under evmm (ioeventfd + irqfd; and again with the
//! disk worker polling 30 µs for the next kick before it sleeps), evmm `--notify exit`,
//! evmm as a vhost-user frontend to `evmm-vhost-user-blk` and to `qemu-storage-daemon`
//! (the kick and call eventfds handed to the backend process) and QEMU `-M microvm`, all
//! on the same disk file, and the raw KVM floor program, one after the other in one
//! run; prints a markdown table (p50, p90, p99, p99.9, mean and
//! the ratio to the floor, in µs; series: poll = kick → used ring seen by polling, kick =
//! the QueueNotify write alone, irq = kick → interrupt handler, irq_wake = kick → the
//! guest's loop sees the interrupt) and evmm's counters per request, and writes
//! `notify-latency.json` and a latency histogram `notify-latency.svg` into DIR.
//! The guest measures in its ring 3, which runs natively even where ring 0 is
//! emulated, so this runs on this host's /dev/kvm. benches/notify-latency runs it.

use clap::Parser;
use evmm_testhost::images::notify_guest;
use evmm_testhost::notify_output::{NotifyRun, Stats};
use evmm_testhost::process::run_with_limit;
use evmm_testhost::qemu::notify_guest_microvm_argv;
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::bench_main;
use evmm_testhost::{Backend, BackendKind};
use plotters::prelude::*;
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
    /// The vhost-user backend serving the disk during this run, if any.
    backend: Option<BackendKind>,
}

#[derive(Serialize)]
struct Row {
    path: String,
    kind: String,
    mode: String,
    stats_us: Stats,
    p50_vs_floor: Option<f64>,
}

#[derive(Serialize)]
struct Counters {
    path: String,
    requests: u64,
    kicks_per_request: f64,
    wakeups_per_request: f64,
    interrupts_per_request: f64,
    notify_exits_per_request: f64,
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
/// The polling window of the polling row (keep its name in step).
const POLL_US: u32 = 30;

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(None, || run(&cli))
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&cli.out)?;
    let guest = match &cli.guest {
        Some(g) if !g.is_file() => return Err(format!("no notify guest at {}", g.display()).into()),
        Some(g) => g.clone(),
        None => notify_guest()?,
    };
    // The disk file lives on tmpfs, so reads measure the notify path, not a disk.
    let shm = Path::new("/dev/shm");
    let disk = if shm.is_dir() {
        shm.join(format!("evmm-notify-bench-{}.img", std::process::id()))
    } else {
        cli.out.join("disk.img")
    };
    let f = std::fs::File::create(&disk)?;
    f.set_len(DISK_MIB << 20)?;
    let _cleanup = RemoveOnDrop(disk.clone());
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
            .map(|kind| Backend::start(kind, &disk, &socket, 1))
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
            rows.push(Row {
                path: p.name.clone(),
                kind: s.kind.clone(),
                mode: s.mode.clone(),
                stats_us: stats.scaled(tsc_mhz),
                p50_vs_floor: floor_p50(&s.mode).map(|f| stats.p50 / f),
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
    let kick_exit_over_ioeventfd = kick_p50("evmm --notify exit")
        .zip(kick_p50("evmm ioeventfd + irqfd"))
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
    let evmm = |notify: &str, poll_us: u32| {
        let metrics = cli
            .out
            .join(format!("evmm-{notify}-poll{poll_us}.metrics.json"));
        let argv = [
            "evmm",
            "--kernel",
            &guest,
            "--memory",
            "256",
            "--disk",
            &format!("path={disk},id={GUEST_ID},poll_us={poll_us}"),
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
    let (a, am) = evmm("ioeventfd", 0);
    let (p, pm) = evmm("ioeventfd", POLL_US);
    let (b, bm) = evmm("exit", 0);
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
    vec![
        NotifyPath {
            name: "evmm ioeventfd + irqfd".into(),
            argv: a,
            metrics: am,
            backend: None,
        },
        NotifyPath {
            name: "evmm ioeventfd + irqfd, poll_us=30".into(),
            argv: p,
            metrics: pm,
            backend: None,
        },
        NotifyPath {
            name: "evmm --notify exit".into(),
            argv: b,
            metrics: bm,
            backend: None,
        },
        NotifyPath {
            name: "evmm + evmm-vhost-user-blk".into(),
            argv: frontend.clone(),
            metrics: None,
            backend: Some(BackendKind::Evmm),
        },
        NotifyPath {
            name: "evmm + qemu-storage-daemon".into(),
            argv: frontend,
            metrics: None,
            backend: Some(BackendKind::QemuStorageDaemon),
        },
        NotifyPath {
            name: format!("QEMU microvm (-cpu {qemu_cpu})"),
            argv: qemu,
            metrics: None,
            backend: None,
        },
        NotifyPath {
            name: "raw KVM floor".into(),
            argv: floor,
            metrics: None,
            backend: None,
        },
    ]
}

fn counters(
    name: &str,
    metrics: &Path,
    requests: u32,
) -> Result<Counters, Box<dyn std::error::Error>> {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(metrics)?)?;
    let t = &m["devices"][0]["transport"];
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
    })
}

fn print_tables(r: &Report) {
    println!("Notify latency, {} requests per series, TSC {:.0} MHz, µs (p50 × floor: against the floor's series of the same mode)\n", r.requests, r.tsc_mhz);
    println!("| path | request | wait | p50 | p90 | p99 | p99.9 | mean | p50 × floor |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in &r.rows {
        let s = &row.stats_us;
        let ratio = row
            .p50_vs_floor
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "–".into());
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            row.path, row.kind, row.mode, s.p50, s.p90, s.p99, s.p999, s.mean, ratio
        );
    }
    if let Some(x) = r.kick_exit_over_ioeventfd {
        println!("\nThe kick itself (QueueNotify write → next guest instruction, GET_ID, p50): an exit to evmm costs {x:.1}× an ioeventfd signal.");
    }
    println!("\n| path | requests | kicks/request | wake-ups/request | interrupts/request | QueueNotify exits/request |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for c in &r.counters {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            c.path,
            c.requests,
            c.kicks_per_request,
            c.wakeups_per_request,
            c.interrupts_per_request,
            c.notify_exits_per_request
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
    let hi = series
        .iter()
        .filter_map(|(_, v)| {
            Stats::of(&v.iter().map(|&x| x as u64).collect::<Vec<_>>()).map(|s| s.p99)
        })
        .fold(1.0, f64::max)
        * 1.2;
    const BUCKETS: usize = 60;
    let width = hi / BUCKETS as f64;
    let hists: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, v)| {
            let mut counts = vec![0u64; BUCKETS];
            for &x in v {
                if x < hi {
                    counts[(x / width) as usize] += 1;
                }
            }
            let n = v.len().max(1) as f64;
            (
                *name,
                counts
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| ((i as f64 + 0.5) * width, 100.0 * c as f64 / n))
                    .collect(),
            )
        })
        .collect();
    let ymax = hists
        .iter()
        .flat_map(|(_, h)| h.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(svg, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("GET_ID: kick → interrupt handler", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..hi, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs)")
        .y_desc("% of requests")
        .draw()?;
    for (i, (name, h)) in hists.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(h.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
