//! `evmm-fio-bench [--seconds S] [--rounds R] [--disk-mib D] [--only TEXT] [--out DIR]`:
//! Debian's fio inside Debian's stock guest on virtio-blk, every way the disk can be
//! served, side by side in one run: 4 KiB random reads at queue depth 1 (p50, p99
//! latency) and 32 (IOPS), 4 KiB random writes at queue depth 32 (IOPS), 128 KiB
//! sequential reads and writes at queue depth 8 (MB/s), and the CPU time the VMM (plus
//! the vhost-user backend, where there is one) spent per I/O while each job ran.
//!
//! Rows: evmm's in-VMM device with the sync engine, the io_uring engine, io_uring with
//! adaptive polling, and io_uring with adaptive polling and the guest polling for
//! completions too (`virtio_blk.poll_queues=1`, fio `--hipri`); evmm as a vhost-user
//! frontend to evmm-vhost-user-blk with each engine; QEMU `-M microvm` with its
//! defaults and with an iothread and `aio=io_uring`. Same kernel, image, disk file and
//! memory; rows alternate within each round. Prints a markdown table (the median round
//! of each row), the ratios the goals are stated in, and writes `fio.json` and
//! `fio.svg` (IOPS per row) into DIR. It runs itself in the nested test host where this
//! host's /dev/kvm cannot boot Linux (every row in the same L1).

use clap::Parser;
use evmm_testhost::cputime::{tree_cpu_split, CpuSplit};
use evmm_testhost::guest::marker_fields;
use evmm_testhost::images::repo_root;
use evmm_testhost::process::slug;
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::{bench_main_with, write_output};
use evmm_testhost::{Backend, BackendKind, EvmmGuest, GuestImages, QemuGuest};
use plotters::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// fio in the guest, every way evmm (and QEMU) can serve the disk.
#[derive(Parser)]
struct Cli {
    /// Seconds each fio job runs.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Boots of each row.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Size of the disk file in MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// Only the rows whose name contains this text.
    #[arg(long)]
    only: Option<String>,
    /// Where the JSON, the plot and the consoles go.
    #[arg(long, default_value = "target/fio")]
    out: PathBuf,
}

/// The whole run's limit where it goes to the nested host.
const NESTED_LIMIT: Duration = Duration::from_secs(3600);
/// Attempts per row and round.
const ATTEMPTS: u32 = 3;
/// The jobs, in the order the guest runs them.
const JOBS: [&str; 5] = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "read-128k",
    "write-128k",
];

/// One way to serve the guest's disk.
struct Row {
    name: String,
    argv: Vec<String>,
    /// The vhost-user backend evmm connects to, and its options.
    backend: Option<(BackendKind, Vec<String>)>,
    /// QEMU rows: the baseline the goals compare with.
    qemu: bool,
}

/// What one job gave.
#[derive(Debug, Clone, Serialize)]
struct JobResult {
    iops: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    ios: u64,
    /// CPU time of the VMM (and backend) per I/O during the job, µs: every thread,
    /// the guest's own running time in the vCPU threads included.
    cpu_us_per_io: f64,
    /// The same without the vCPU threads: the device's own cost (workers, event
    /// loops, the backend).
    device_cpu_us_per_io: f64,
}

#[derive(Serialize)]
struct RowReport {
    name: String,
    /// job → the median round's result.
    jobs: BTreeMap<String, JobResult>,
    rounds: usize,
}

#[derive(Serialize)]
struct Report {
    seconds: u32,
    disk_mib: u64,
    qemu_cpu: String,
    rows: Vec<RowReport>,
    failures: Vec<String>,
    retried: Vec<String>,
}

/// The guest image with fio, in a folder of its own so that other nested runs do not
/// carry it.
fn fio_image() -> PathBuf {
    repo_root().join("guest-images/out/fio/initramfs.cpio.gz")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main_with(Some(NESTED_LIMIT), &[fio_image()], || run(&cli))
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&cli.out)?;
    let mut images = GuestImages::existing()?;
    let fio_image = fio_image();
    if !fio_image.is_file() {
        return Err(format!(
            "{} is missing: build it with guest-images/build --fio (benches/fio does)",
            fio_image.display()
        )
        .into());
    }
    images.initramfs = fio_image;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.img");
    // Not sparse: every row reads the same data from the host's page cache.
    std::fs::write(&disk, vec![0x5a; (cli.disk_mib << 20) as usize])?;
    let socket = dir.path().join("blk.sock");
    let qemu_cpu = kvm_cpu_model()?.model;
    let rows = rows(cli, &images, &disk, &socket, &qemu_cpu);
    let rows: Vec<Row> = rows
        .into_iter()
        .filter(|r| cli.only.as_ref().is_none_or(|o| r.name.contains(o)))
        .collect();
    if rows.is_empty() {
        return Err("--only matches no row".into());
    }

    let mut results: Vec<Vec<BTreeMap<String, JobResult>>> = vec![Vec::new(); rows.len()];
    let mut failures = Vec::new();
    let mut retried = Vec::new();
    let limit = Duration::from_secs(240 + 6 * u64::from(cli.seconds) * JOBS.len() as u64);
    for round in 1..=cli.rounds {
        for (i, row) in rows.iter().enumerate() {
            let started = Instant::now();
            let console = cli
                .out
                .join(format!("{}-round{round}.console", slug(&row.name)));
            // In the nested host a guest sometimes resets or stalls, under QEMU as under
            // evmm (README, Known problems): a row gets up to three attempts, each
            // failure printed and counted.
            let mut outcome = run_row(row, &disk, &socket, limit, &console);
            for attempt in 2..=ATTEMPTS {
                let Err(e) = &outcome else { break };
                eprintln!(
                    "round {round}/{}: {}: attempt {} of {ATTEMPTS} failed ({e}); again",
                    cli.rounds,
                    row.name,
                    attempt - 1
                );
                if let Ok(text) = std::fs::read(&console) {
                    let kept = console.with_extension(format!("attempt{}.console", attempt - 1));
                    write_output(&kept, &text)?;
                }
                retried.push(format!("{} (round {round}): {e}", row.name));
                outcome = run_row(row, &disk, &socket, limit, &console);
            }
            match outcome {
                Ok(jobs) => {
                    eprintln!(
                        "round {round}/{}: {} ({:.0} s): {}",
                        cli.rounds,
                        row.name,
                        started.elapsed().as_secs_f64(),
                        JOBS.iter()
                            .filter_map(|j| jobs.get(*j).map(|r| format!("{j} {:.0} IOPS", r.iops)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    results[i].push(jobs);
                }
                Err(e) => {
                    eprintln!(
                        "round {round}/{}: {}: FAILED: {e} (console: {})",
                        cli.rounds,
                        row.name,
                        console.display()
                    );
                    if let Ok(text) = std::fs::read(&console) {
                        write_output(&console, &text)?;
                    }
                    failures.push(format!("{} (round {round}): {e}", row.name));
                }
            }
        }
    }

    let reports: Vec<RowReport> = rows
        .iter()
        .zip(&results)
        .map(|(row, runs)| RowReport {
            name: row.name.clone(),
            jobs: median_jobs(runs),
            rounds: runs.len(),
        })
        .collect();
    print_table(cli, &rows, &reports);
    if !retried.is_empty() {
        println!("\nAttempts that failed and were made again:");
        for r in &retried {
            println!("- {r}");
        }
    }
    let report = Report {
        seconds: cli.seconds,
        disk_mib: cli.disk_mib,
        qemu_cpu,
        rows: reports,
        failures: failures.clone(),
        retried,
    };
    write_output(
        &cli.out.join("fio.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let svg = cli.out.join("fio.svg");
    plot(&svg, &report)?;
    write_output(&svg, &std::fs::read(&svg)?)?;
    eprintln!(
        "wrote {} and {}",
        cli.out.join("fio.json").display(),
        svg.display()
    );
    if !failures.is_empty() {
        println!("\nFailed rounds (left out of the table):");
        for f in &failures {
            println!("- {f}");
        }
        return Err(format!("{} round(s) failed", failures.len()).into());
    }
    Ok(())
}

fn rows(cli: &Cli, images: &GuestImages, disk: &Path, socket: &Path, qemu_cpu: &str) -> Vec<Row> {
    let disk_s = disk.display().to_string();
    let secs = cli.seconds.to_string();
    let evmm = |disk_opts: &str, hipri: bool| {
        let mut guest = EvmmGuest::new("fio");
        guest
            .cmdline
            .push_str(&format!(" evmm.args=/dev/vda,{secs}"));
        if hipri {
            guest.cmdline.push_str(",hipri virtio_blk.poll_queues=1");
        }
        guest.extra = vec!["--disk".into(), format!("path={disk_s},{disk_opts}")];
        guest.argv(images)
    };
    let frontend = || {
        let mut guest = EvmmGuest::new("fio");
        guest
            .cmdline
            .push_str(&format!(" evmm.args=/dev/vda,{secs}"));
        guest.extra = vec![
            "--vhost-user-blk".into(),
            format!("socket={}", socket.display()),
        ];
        guest.argv(images)
    };
    let qemu = |iothread: bool| {
        let mut q = QemuGuest::microvm("fio");
        q.cpu = Some(qemu_cpu.to_string());
        q.cmdline.push_str(&format!(" evmm.args=/dev/vda,{secs}"));
        let (aio, device) = if iothread {
            (",aio=io_uring", "virtio-blk-device,drive=a,iothread=io0")
        } else {
            ("", "virtio-blk-device,drive=a")
        };
        let mut extra: Vec<String> = Vec::new();
        if iothread {
            extra.extend(["-object".into(), "iothread,id=io0".into()]);
        }
        extra.extend([
            "-drive".into(),
            format!("id=a,file={disk_s},format=raw,if=none{aio}"),
            "-device".into(),
            device.into(),
        ]);
        q.extra = extra;
        q.argv(images)
    };
    let row = |name: &str, argv, backend, qemu| Row {
        name: name.into(),
        argv,
        backend,
        qemu,
    };
    vec![
        row("evmm, engine=sync", evmm("engine=sync", false), None, false),
        row(
            "evmm, engine=io_uring",
            evmm("engine=io_uring", false),
            None,
            false,
        ),
        row(
            "evmm, engine=io_uring, poll=adaptive",
            evmm("engine=io_uring,poll=adaptive", false),
            None,
            false,
        ),
        row(
            "evmm, engine=io_uring, poll=adaptive, guest polls (hipri)",
            evmm("engine=io_uring,poll=adaptive,queues=2", true),
            None,
            false,
        ),
        row(
            "evmm + evmm-vhost-user-blk --engine sync",
            frontend(),
            Some((BackendKind::Evmm, vec!["--engine".into(), "sync".into()])),
            false,
        ),
        row(
            "evmm + evmm-vhost-user-blk --engine io_uring",
            frontend(),
            Some((
                BackendKind::Evmm,
                vec!["--engine".into(), "io_uring".into()],
            )),
            false,
        ),
        row(
            &format!("QEMU microvm (-cpu {qemu_cpu}), defaults"),
            qemu(false),
            None,
            true,
        ),
        row(
            "QEMU microvm, iothread, aio=io_uring",
            qemu(true),
            None,
            true,
        ),
    ]
}

/// Boots `row`, follows the guest's console line by line, samples the CPU time of the
/// VMM (and backend) at each job's start and end, and returns each job's figures.
fn run_row(
    row: &Row,
    disk: &Path,
    socket: &Path,
    limit: Duration,
    console_path: &Path,
) -> Result<BTreeMap<String, JobResult>, String> {
    let backend = row
        .backend
        .as_ref()
        .map(|(kind, extra)| {
            let mut argv = kind.argv(
                &disk.display().to_string(),
                &socket.display().to_string(),
                1,
            );
            argv.extend(extra.iter().cloned());
            Backend::spawn(*kind, &argv, socket, None)
        })
        .transpose()
        .map_err(|e| e.to_string())?;
    let backend_pid = backend.as_ref().and_then(Backend::pid);
    let mut child = Command::new(&row.argv[0])
        .args(&row.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", row.argv[0]))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let cpu = || tree_cpu_split(pid) + backend_pid.map(tree_cpu_split).unwrap_or_default();
    let deadline = Instant::now() + limit;
    let mut console = Vec::new();
    let mut started_cpu = BTreeMap::new();
    let mut spent = BTreeMap::new();
    let mut reports = BTreeMap::new();
    let mut ended = false;
    while !ended {
        let left = deadline.saturating_duration_since(Instant::now());
        // A guest that keeps printing must not keep the row alive past its limit.
        let next = if left.is_zero() {
            Err(mpsc::RecvTimeoutError::Timeout)
        } else {
            rx.recv_timeout(left)
        };
        match next {
            Ok(line) => {
                if let Some(f) = marker_fields(&line, "EVMM-FIO-START") {
                    started_cpu.insert(f.get("job").cloned().unwrap_or_default(), cpu());
                } else if let Some(f) = marker_fields(&line, "EVMM-FIO-END") {
                    let job = f.get("job").cloned().unwrap_or_default();
                    if let Some(at) = started_cpu.get(&job) {
                        let now: CpuSplit = cpu();
                        spent.insert(
                            job,
                            CpuSplit {
                                total: now.total.saturating_sub(at.total),
                                vcpu: now.vcpu.saturating_sub(at.vcpu),
                            },
                        );
                    }
                } else if let Some(at) = line.find("EVMM-FIO-JSON job=") {
                    let rest = &line[at + "EVMM-FIO-JSON job=".len()..];
                    if let Some((job, json)) = rest.split_once(' ') {
                        reports.insert(job.to_string(), json.to_string());
                    }
                }
                console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => ended = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                stop(&mut child);
                let _ = std::fs::write(console_path, console.join("\n"));
                return Err(format!("still running after {limit:?}, killed"));
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    drop(backend);
    let _ = std::fs::write(console_path, console.join("\n"));
    if let Some(e) = console.iter().find(|l| l.contains("EVMM-FIO-ERROR")) {
        return Err(e.clone());
    }
    if !status.success() {
        return Err(format!("the VMM ended with {status}"));
    }
    let mut jobs = BTreeMap::new();
    for job in JOBS {
        let json = reports
            .get(job)
            .ok_or_else(|| format!("no fio report for {job}"))?;
        let cpu = spent.get(job).copied().unwrap_or_default();
        jobs.insert(
            job.to_string(),
            parse_fio(json, cpu).map_err(|e| format!("{job}: {e}"))?,
        );
    }
    Ok(jobs)
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The figures of one fio JSON report: the read or the write side, whichever moved data.
fn parse_fio(json: &str, cpu: CpuSplit) -> Result<JobResult, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("bad fio JSON ({e})"))?;
    let job = &v["jobs"][0];
    let side = ["read", "write"]
        .iter()
        .map(|s| &job[*s])
        .find(|s| s["total_ios"].as_u64().unwrap_or(0) > 0)
        .ok_or("the job did no I/O")?;
    let ios = side["total_ios"].as_u64().unwrap_or(0);
    let pct = |p: &str| {
        side["clat_ns"]["percentile"][p]
            .as_f64()
            .map(|ns| ns / 1000.0)
            .unwrap_or(f64::NAN)
    };
    Ok(JobResult {
        iops: side["iops"].as_f64().unwrap_or(f64::NAN),
        mb_per_s: side["bw_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        ios,
        cpu_us_per_io: cpu.total.as_secs_f64() * 1e6 / ios.max(1) as f64,
        device_cpu_us_per_io: cpu.devices().as_secs_f64() * 1e6 / ios.max(1) as f64,
    })
}

/// Per job, the result of the median round by IOPS.
fn median_jobs(runs: &[BTreeMap<String, JobResult>]) -> BTreeMap<String, JobResult> {
    let mut out = BTreeMap::new();
    for job in JOBS {
        let mut all: Vec<&JobResult> = runs.iter().filter_map(|r| r.get(job)).collect();
        if all.is_empty() {
            continue;
        }
        all.sort_by(|a, b| a.iops.total_cmp(&b.iops));
        out.insert(job.to_string(), all[all.len() / 2].clone());
    }
    out
}

fn print_table(cli: &Cli, rows: &[Row], reports: &[RowReport]) {
    println!(
        "fio in the guest, {} s per job, {} MiB disk, median of {} round(s); CPU: the VMM's (plus the backend's) per I/O, the vCPU threads' (which run the guest) included and left out\n",
        cli.seconds, cli.disk_mib, cli.rounds
    );
    println!("| disk served by | QD1 read p50 µs | QD1 read p99 µs | QD32 read IOPS | QD32 write IOPS | 128K read MB/s | 128K write MB/s | CPU µs/IO QD32 read, all threads | of which not vCPUs |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in reports {
        let j = |name: &str| r.jobs.get(name);
        let f = |v: Option<f64>, d: usize| {
            v.filter(|x| x.is_finite())
                .map(|x| format!("{x:.d$}"))
                .unwrap_or_else(|| "–".into())
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            f(j(JOBS[0]).map(|x| x.p50_us), 1),
            f(j(JOBS[0]).map(|x| x.p99_us), 1),
            f(j(JOBS[1]).map(|x| x.iops), 0),
            f(j(JOBS[2]).map(|x| x.iops), 0),
            f(j(JOBS[3]).map(|x| x.mb_per_s), 1),
            f(j(JOBS[4]).map(|x| x.mb_per_s), 1),
            f(j(JOBS[1]).map(|x| x.cpu_us_per_io), 1),
            f(j(JOBS[1]).map(|x| x.device_cpu_us_per_io), 1),
        );
    }
    // The goals are stated against QEMU's best row.
    let best = |job: &str, key: fn(&JobResult) -> f64, higher: bool, qemu: bool| {
        rows.iter()
            .zip(reports)
            .filter(|(row, _)| row.qemu == qemu)
            .filter_map(|(row, r)| r.jobs.get(job).map(|x| (row.name.as_str(), key(x))))
            .filter(|(_, v)| v.is_finite())
            .max_by(|a, b| {
                if higher {
                    a.1.total_cmp(&b.1)
                } else {
                    b.1.total_cmp(&a.1)
                }
            })
    };
    println!();
    let goals: [Goal; 5] = [
        ("QD32 random read IOPS", JOBS[1], |x| x.iops, true),
        ("QD32 random write IOPS", JOBS[2], |x| x.iops, true),
        ("QD1 random read p50", JOBS[0], |x| x.p50_us, false),
        (
            "128 KiB sequential read MB/s",
            JOBS[3],
            |x| x.mb_per_s,
            true,
        ),
        (
            "128 KiB sequential write MB/s",
            JOBS[4],
            |x| x.mb_per_s,
            true,
        ),
    ];
    for (what, job, key, higher) in goals {
        if let (Some((e_name, e)), Some((q_name, q))) =
            (best(job, key, higher, false), best(job, key, higher, true))
        {
            println!("- {what}: evmm's best ({e_name}) {e:.1} against QEMU's best ({q_name}) {q:.1}: {:.2}×", e / q);
        }
    }
}

/// A figure compared with QEMU's: its name, the job, how to read it from a result,
/// whether higher is better.
type Goal = (&'static str, &'static str, fn(&JobResult) -> f64, bool);

/// IOPS of the QD32 jobs per row, as horizontal bars.
fn plot(svg: &Path, report: &Report) -> Result<(), Box<dyn std::error::Error>> {
    let n = report.rows.len();
    let iops = |r: &RowReport, job: &str| r.jobs.get(job).map(|x| x.iops).unwrap_or(0.0);
    let max = report
        .rows
        .iter()
        .flat_map(|r| [iops(r, JOBS[1]), iops(r, JOBS[2])])
        .fold(1.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(svg, (1000, 60 + 50 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "fio in the guest: 4 KiB IOPS at queue depth 32",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(10)
        .build_cartesian_2d(0.0..max, 0.0..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc("IOPS")
        .draw()?;
    for (i, r) in report.rows.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let read = iops(r, JOBS[1]);
        let write = iops(r, JOBS[2]);
        chart.draw_series([
            Rectangle::new([(0.0, y + 0.5), (read, y + 0.85)], BLUE.mix(0.6).filled()),
            Rectangle::new([(0.0, y + 0.15), (write, y + 0.5)], RED.mix(0.6).filled()),
        ])?;
        chart.draw_series([Text::new(
            format!("{} (read {read:.0}, write {write:.0})", r.name),
            (max * 0.01, y + 0.92),
            ("sans-serif", 13),
        )])?;
    }
    root.present()?;
    Ok(())
}
