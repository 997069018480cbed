//! `evmm-net-notify-bench [--requests N] [--out DIR] [--here]`: notify latency through
//! the network path. The notify guest (crates/notify-guest) in its net mode drives one
//! virtio-net device from ring 3: each request sends a UDP frame on TX, kicks, and
//! times (TSC) the kick itself, kick → TX used, kick → the echoed frame in the RX used
//! ring, and kick → the RX interrupt handler. On the tap's other side `evmm-net-echo`
//! answers each frame from a packet socket and measures its own share.
//!
//! Rows: evmm's in-VMM worker (ioeventfd + irqfd), evmm `--notify exit`, evmm
//! `vhost=on` (the kernel's vhost-net worker), QEMU microvm's `virtio-net-device` with
//! `vhost=off` and `vhost=on`, and the raw floor (`evmm-notify-floor --tap`: ioeventfd
//! → the same tap and echo → irqfd, no virtio). Each row runs in a network namespace
//! of its own that the bench creates (a tap, the echo, nothing else; the namespace ends
//! with the row). The rows run on this host, where ring-3 guest code runs natively
//! (the vhost rows only where /dev/vhost-net exists), and then, unless `--here`, all
//! of them again in the nested test host, where /dev/vhost-net exists: two tables, each
//! comparing rows of one host. Writes `net-notify-latency-<where>.json` and `.svg`
//! (histogram of kick → RX interrupt) into DIR. benches/net-notify-latency runs it.

use clap::Parser;
use evmm_bench::notify_run::{guest_elf, host_label, rerun_with_vhost_net, vhost_net};
use evmm_testhost::echo_netns::{self, EchoSummary};
use evmm_testhost::notify_output::{NotifyRun, Stats};
use evmm_testhost::process::slug;
use evmm_testhost::qemu::notify_guest_microvm_net_argv;
use evmm_testhost::route::{bench_main, write_output};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Network notify-latency benchmark: every network notify path side by side.
#[derive(Parser)]
struct Cli {
    /// The notify guest; default: built from crates/notify-guest.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Requests per series.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    requests: u32,
    /// Where the JSON, the plot and the consoles go.
    #[arg(long, default_value = "target/net-notify-latency")]
    out: PathBuf,
    /// Only the rows of the host this runs on (the nested run is made with it).
    #[arg(long)]
    here: bool,
}

/// The tap of every row (each in a namespace of its own).
const TAP: &str = "evmmn0";
/// Longest one row may take.
const ROW_LIMIT: Duration = Duration::from_secs(300);
/// Longest the nested run may take.
const NESTED_LIMIT: Duration = Duration::from_secs(2400);
const MEMORY_MIB: u32 = 256;

/// One way the kick travels.
struct NetPath {
    name: &'static str,
    argv: Vec<String>,
    metrics: Option<PathBuf>,
    needs_vhost_net: bool,
}

/// A row that ran: its path, the guest's (or floor's) output, the echo's summary.
type DoneRow = (NetPath, NotifyRun, Option<EchoSummary>);

#[derive(Serialize)]
struct Row {
    path: String,
    series: String,
    stats_us: Stats,
    /// p50 over the floor's p50 of the matching wait (RX used ↔ poll, RX interrupt ↔ irq).
    p50_vs_floor: Option<f64>,
    /// The guest's QueueNotify writes per request (kick suppression honoured).
    guest_kicks_per_request: Option<f64>,
}

#[derive(Serialize)]
struct EchoShare {
    path: String,
    frames: u64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Serialize, Default)]
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
    host: String,
    requests: u32,
    tsc_mhz: f64,
    rows: Vec<Row>,
    echo: Vec<EchoShare>,
    counters: Vec<Counters>,
    /// Rows left out here, with why.
    not_here: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(None, || run(&cli))
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&cli.out)?;
    let guest = guest_elf(cli.guest.as_deref())?;
    let host = host_label("rows");
    let in_nested_host = host == "nested";
    run_rows(cli, &guest, host, in_nested_host)?;
    if cli.here || in_nested_host {
        return Ok(());
    }
    eprintln!("now every row again in the nested test host, where /dev/vhost-net exists");
    let args: Vec<String> = vec![
        "--requests".into(),
        cli.requests.to_string(),
        "--out".into(),
        cli.out.display().to_string(),
    ];
    rerun_with_vhost_net("evmm-net-notify-bench", &args, &guest, NESTED_LIMIT)
}

fn run_rows(
    cli: &Cli,
    guest: &Path,
    host: &str,
    must_have_vhost: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let vhost_net = vhost_net(must_have_vhost)?;
    let mut not_here = Vec::new();
    let mut done = Vec::new();
    let all = paths(cli, guest, host);
    let total = all.len();
    for (i, p) in all.into_iter().enumerate() {
        if p.needs_vhost_net && !vhost_net {
            eprintln!(
                "[{}/{total}] {}: not here (no /dev/vhost-net; the nested table has it)",
                i + 1,
                p.name
            );
            not_here.push(format!("{}: no /dev/vhost-net on this host", p.name));
            continue;
        }
        eprintln!("[{}/{total}] {}: {}", i + 1, p.name, p.argv.join(" "));
        let (console, echo) = run_row(&p)?;
        std::fs::write(
            cli.out.join(format!("{host}-{}.console", slug(p.name))),
            &console,
        )?;
        let run = NotifyRun::parse(&console);
        let expected = Some(u64::from(cli.requests));
        if run.done != expected || !run.errors.is_empty() || run.series.iter().any(|s| s.errors > 0)
        {
            return Err(format!(
                "{} did not complete cleanly: {:?}; console in {}",
                p.name,
                run.errors,
                cli.out.display()
            )
            .into());
        }
        done.push((p, run, echo));
    }
    let tsc_khz = done
        .iter()
        .find_map(|(_, r, _)| r.tsc_khz)
        .ok_or("no run reported the TSC frequency (the floor prints it)")?;
    let tsc_mhz = tsc_khz as f64 / 1000.0;
    let report = report(cli, host, tsc_mhz, &done, not_here)?;
    print_tables(&report);
    let json = cli.out.join(format!("net-notify-latency-{host}.json"));
    write_output(&json, serde_json::to_string_pretty(&report)?.as_bytes())?;
    let svg = cli.out.join(format!("net-notify-latency-{host}.svg"));
    plot(&svg, host, &done, tsc_mhz)?;
    write_output(&svg, &std::fs::read(&svg)?)?;
    eprintln!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

fn paths(cli: &Cli, guest: &Path, host: &str) -> Vec<NetPath> {
    let guest = guest.display().to_string();
    let cmdline = format!("notify.net=1 notify.requests={}", cli.requests);
    let evmm = |label: &str, net: &str, notify: &str| {
        let metrics = cli.out.join(format!("{host}-{label}.metrics.json"));
        let argv: Vec<String> = [
            "evmm",
            "--kernel",
            &guest,
            "--memory",
            &MEMORY_MIB.to_string(),
            "--net",
            &format!("tap={TAP}{net}"),
            "--notify",
            notify,
            "--cmdline",
            &cmdline,
            "--metrics",
            &metrics.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        (argv, Some(metrics))
    };
    let row = |name, (argv, metrics): (Vec<String>, Option<PathBuf>), needs_vhost_net| NetPath {
        name,
        argv,
        metrics,
        needs_vhost_net,
    };
    let qemu = |vhost| notify_guest_microvm_net_argv(&guest, TAP, vhost, cli.requests, MEMORY_MIB);
    vec![
        row(
            "evmm, in-VMM worker (ioeventfd + irqfd)",
            evmm("evmm", "", "ioeventfd"),
            false,
        ),
        row("evmm --notify exit", evmm("evmm-exit", "", "exit"), false),
        row(
            "evmm vhost=on (kernel vhost-net)",
            evmm("evmm-vhost", ",vhost=on", "ioeventfd"),
            true,
        ),
        row("QEMU microvm, vhost=off", (qemu(false), None), false),
        row("QEMU microvm, vhost=on", (qemu(true), None), true),
        row(
            "raw floor: ioeventfd → tap → echo → irqfd",
            (
                vec![
                    "evmm-notify-floor".into(),
                    "--requests".into(),
                    cli.requests.to_string(),
                    "--tap".into(),
                    TAP.into(),
                ],
                None,
            ),
            false,
        ),
    ]
}

/// Runs one row in a network namespace of its own ([`echo_netns`]); its console and
/// the echo's summary.
fn run_row(p: &NetPath) -> Result<(String, Option<EchoSummary>), Box<dyn std::error::Error>> {
    let r =
        echo_netns::run(TAP, &p.argv, ROW_LIMIT, None).map_err(|e| format!("{}: {e}", p.name))?;
    if r.vmm_status != Some(0) {
        return Err(format!(
            "{}: the VMM exited {:?}; output:\n{}",
            p.name, r.vmm_status, r.console
        )
        .into());
    }
    Ok((r.console, r.echo))
}

/// The floor's series that matches a guest series.
fn floor_mode(series: &str) -> Option<&'static str> {
    match series {
        "rx_used" => Some("poll"),
        "rx_irq" => Some("irq"),
        "rx_irq_wake" => Some("irq_wake"),
        _ => None,
    }
}

fn report(
    cli: &Cli,
    host: &str,
    tsc_mhz: f64,
    done: &[DoneRow],
    not_here: Vec<String>,
) -> Result<Report, Box<dyn std::error::Error>> {
    let floor = done
        .iter()
        .find(|(p, _, _)| p.name.starts_with("raw floor"));
    let floor_p50 = |mode: &str| {
        floor
            .and_then(|(_, r, _)| r.series("floor_echo", mode))
            .and_then(|s| Stats::of(&s.cycles))
            .map(|s| s.p50)
    };
    let mut rows = Vec::new();
    let mut echo = Vec::new();
    let mut counters = Vec::new();
    for (p, run, share) in done {
        for s in &run.series {
            let Some(stats) = Stats::of(&s.cycles) else {
                continue;
            };
            let matching = if s.kind == "floor_echo" {
                Some(s.mode.as_str())
            } else {
                floor_mode(&s.mode)
            };
            rows.push(Row {
                path: p.name.to_string(),
                series: s.mode.clone(),
                stats_us: stats.scaled(tsc_mhz),
                p50_vs_floor: matching.and_then(floor_p50).map(|f| stats.p50 / f),
                guest_kicks_per_request: s.kicks.map(|k| k as f64 / s.cycles.len().max(1) as f64),
            });
        }
        if let Some(e) = share {
            echo.push(EchoShare {
                path: p.name.to_string(),
                frames: e.frames,
                p50_us: e.share_p50_ns as f64 / 1000.0,
                p99_us: e.share_p99_ns as f64 / 1000.0,
            });
        }
        if let Some(m) = &p.metrics {
            // With vhost=on the kernel's worker moves the frames; evmm counts nothing.
            if let Some(c) = counters_of(p.name, m, 2 * u64::from(cli.requests))? {
                counters.push(c);
            }
        }
    }
    Ok(Report {
        host: host.to_string(),
        requests: cli.requests,
        tsc_mhz,
        rows,
        echo,
        counters,
        not_here,
    })
}

/// evmm's counters of the run per request (a poll pass and an interrupt pass of N
/// requests each); `None` when the kernel's vhost-net moved the frames.
fn counters_of(
    name: &str,
    metrics: &Path,
    requests: u64,
) -> Result<Option<Counters>, Box<dyn std::error::Error>> {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(metrics)?)?;
    let t = &m["devices"][0]["transport"];
    if t["device"]["backend"] == "vhost-net" {
        return Ok(None);
    }
    let sum = |keys: &[&str]| -> u64 {
        t["device"]["queues"]
            .as_array()
            .map(|qs| {
                qs.iter()
                    .flat_map(|q| keys.iter().filter_map(move |k| q[*k].as_u64()))
                    .sum()
            })
            .unwrap_or(0)
    };
    let per = |v: u64| v as f64 / requests as f64;
    Ok(Some(Counters {
        path: name.to_string(),
        requests,
        kicks_per_request: per(sum(&["rx_kicks", "tx_kicks"])),
        wakeups_per_request: per(sum(&["wakeups"])),
        interrupts_per_request: per(sum(&["interrupts"])),
        notify_exits_per_request: per(t["notify_exits"].as_u64().unwrap_or(0)),
    }))
}

fn print_tables(r: &Report) {
    println!(
        "\nNetwork notify latency ({}), {} requests per series, TSC {:.0} MHz, µs; \
         p50 × floor: against the raw floor's matching wait (rx_used ↔ poll, rx_irq ↔ irq)\n",
        if r.host == "nested" {
            "nested host: L1's KVM on QEMU's emulated SVM"
        } else {
            "this host's KVM"
        },
        r.requests,
        r.tsc_mhz
    );
    println!(
        "| path | series | p50 | p90 | p99 | p99.9 | mean | p50 × floor | guest kicks/request |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let or_dash = |v: Option<f64>, digits: usize| {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "–".into())
    };
    for row in &r.rows {
        let s = &row.stats_us;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            row.path,
            row.series,
            s.p50,
            s.p90,
            s.p99,
            s.p999,
            s.mean,
            or_dash(row.p50_vs_floor, 2),
            or_dash(row.guest_kicks_per_request, 3)
        );
    }
    if !r.not_here.is_empty() {
        println!();
    }
    for n in &r.not_here {
        println!("Not in this table: {n}.");
    }
    println!("\nThe echo's own share (kernel receive timestamp → its answer queued on the tap), to subtract:\n");
    println!("| path | frames | p50 µs | p99 µs |");
    println!("| --- | ---: | ---: | ---: |");
    for e in &r.echo {
        println!(
            "| {} | {} | {:.1} | {:.1} |",
            e.path, e.frames, e.p50_us, e.p99_us
        );
    }
    println!(
        "\nevmm's counters per request (both passes; the interrupt pass alone interrupts; \
         with vhost=on the kernel's worker moves the frames and evmm counts nothing):\n"
    );
    println!("| path | requests | kicks/request | wake-ups/request | interrupts/request | QueueNotify exits/request |");
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
    let p50 = |path: &str, series: &str| {
        r.rows
            .iter()
            .find(|x| x.path.starts_with(path) && x.series == series)
            .map(|x| x.stats_us.p50)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let vhost = p50("evmm vhost=on", "rx_irq");
    let own = p50("evmm, in-VMM", "rx_irq");
    let exit = p50("evmm --notify exit", "rx_irq");
    if let Some(x) = ratio(vhost, own) {
        println!("\nkick → RX interrupt, p50: the kernel's vhost worker takes {x:.2}× evmm's own worker's time");
    }
    if let Some(x) = ratio(vhost, exit) {
        println!("kick → RX interrupt, p50: the kernel's vhost worker takes {x:.2}× the exit-per-kick path's time");
    }
    if let Some(x) = ratio(own, exit) {
        println!("kick → RX interrupt, p50: evmm's ioeventfd path takes {x:.2}× the exit-per-kick path's time");
    }
}

/// Histograms of kick → RX interrupt handler (the floor's irq series).
fn plot(
    svg: &Path,
    host: &str,
    done: &[DoneRow],
    tsc_mhz: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let series: Vec<(&str, Vec<f64>)> = done
        .iter()
        .filter_map(|(p, r, _)| {
            let s = r
                .series("udp_echo", "rx_irq")
                .or_else(|| r.series("floor_echo", "irq"))?;
            Some((
                p.name,
                s.cycles.iter().map(|&c| c as f64 / tsc_mhz).collect(),
            ))
        })
        .collect();
    evmm_bench::histogram::latency_svg(
        svg,
        &format!("UDP echo: kick → RX interrupt handler ({host})"),
        &series,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_waits_match_the_floor_s() {
        assert_eq!(floor_mode("rx_used"), Some("poll"));
        assert_eq!(floor_mode("rx_irq"), Some("irq"));
        assert_eq!(floor_mode("kick"), None);
    }
}
