//! `evmm-net-bench [--rounds R] [--seconds S] [--requests N] [--out DIR]`: virtio-net
//! on a tap, evmm against QEMU `-M microvm`'s `virtio-net-device` (vhost=off), same
//! kernel, initramfs, tap set-up and peer, alternating in one run: TCP throughput
//! guest → L1 and L1 → guest (iperf3), UDP request/response latency (p50/p99, 64-byte
//! datagrams), and 64-byte UDP datagrams per second guest → L1 (iperf3 -u). Prints a
//! markdown table and writes `net.json` and `net.svg` into DIR. It runs itself in the
//! nested test host where this host's /dev/kvm cannot boot Linux (every row in the same
//! L1; the test network exists only there).

use clap::Parser;
use evmm_testhost::net::{evmm_net_guest, qemu_net_guest, QemuNet, Side, DEFAULT_MAC, DEFAULT_TAP};
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::bench_main;
use evmm_testhost::{GuestImages, NetOutput, NetPlan, NetRun, Route};
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// virtio-net throughput and latency: evmm and QEMU microvm side by side.
#[derive(Parser)]
struct Cli {
    /// Boots of each VMM (the median round is shown).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// UDP request/response exchanges.
    #[arg(long, default_value_t = 2000)]
    requests: u32,
    /// Where the JSON and the plot go.
    #[arg(long, default_value = "target/net-bench")]
    out: PathBuf,
}

/// The whole run's limit where it goes to the nested host.
const NESTED_LIMIT: Duration = Duration::from_secs(3600);
/// Longest one boot may take.
const BOOT_LIMIT: Duration = Duration::from_secs(900);

/// One row's figures.
#[derive(Debug, Clone, Serialize)]
struct Figures {
    tcp_guest_to_l1_mbit_s: f64,
    tcp_l1_to_guest_mbit_s: f64,
    udp_rr_p50_us: f64,
    udp_rr_p99_us: f64,
    udp64_guest_to_l1_kpps: f64,
}

#[derive(Serialize)]
struct Row {
    vmm: String,
    rounds: Vec<Figures>,
    median: Option<Figures>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(Some(NESTED_LIMIT), || run(&cli))
}

fn plan(cli: &Cli) -> NetPlan {
    let s = cli.seconds;
    NetPlan::new()
        .link_up(DEFAULT_MAC, 1500)
        .udp_rr(Side::Guest, cli.requests, Some(64))
        .iperf3(Side::Guest, s, &[])
        .iperf3(Side::Guest, s, &["-R"])
        .iperf3(Side::Guest, s, &["-u", "-l", "64", "-b", "0"])
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&cli.out)?;
    let images = GuestImages::existing()?;
    let route = Route::detect()?;
    let plan = plan(cli);
    let evmm = evmm_net_guest(&plan.guest, DEFAULT_TAP, &[&format!("mac={DEFAULT_MAC}")]);
    let qemu = qemu_net_guest(&plan.guest, &QemuNet::default());
    let cpu = kvm_cpu_model()?;
    let vmms = [
        ("evmm, in-VMM virtio-net".to_string(), evmm.argv(&images)),
        (
            format!(
                "QEMU -M microvm (-cpu {}), virtio-net-device vhost=off",
                cpu.model
            ),
            qemu.argv(&images),
        ),
    ];
    let mut rows: Vec<Row> = vmms
        .iter()
        .map(|(name, _)| Row {
            vmm: name.clone(),
            rounds: Vec::new(),
            median: None,
        })
        .collect();
    for round in 1..=cli.rounds {
        for ((name, argv), row) in vmms.iter().zip(&mut rows) {
            let mut net_run = NetRun::new(argv.clone(), plan.peer.clone()).for_route(&route);
            net_run.vmm_limit = BOOT_LIMIT;
            let out = route.run(
                &["sh", "-c", &net_run.script()],
                BOOT_LIMIT + Duration::from_secs(60),
            )?;
            let parsed = NetOutput::parse(&out.output);
            match figures(&parsed) {
                Some(f) => {
                    eprintln!("round {round}/{}: {name}: {f:?}", cli.rounds);
                    row.rounds.push(f);
                }
                None => eprintln!(
                    "round {round}/{}: {name}: incomplete ({:?}); output:\n{}",
                    cli.rounds,
                    parsed.problems(),
                    out.output
                ),
            }
        }
    }
    for row in &mut rows {
        row.median = median(&row.rounds);
    }
    print_table(&rows, cli);
    std::fs::write(
        cli.out.join("net.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    let svg = cli.out.join("net.svg");
    plot(&svg, &rows)?;
    eprintln!(
        "wrote {} and {}",
        cli.out.join("net.json").display(),
        svg.display()
    );
    if rows.iter().any(|r| r.median.is_none()) {
        return Err("a VMM completed no round".into());
    }
    Ok(())
}

/// The figures of one run, when every measurement is there.
fn figures(out: &NetOutput) -> Option<Figures> {
    let rr = out.udp_rr.iter().find(|r| r.side == Side::Guest && r.ok)?;
    let clients: Vec<_> = out
        .iperf3
        .iter()
        .filter(|r| r.side == Side::Guest && r.role == "client" && r.ok)
        .collect();
    let [tx, rx, udp] = clients.as_slice() else {
        return None;
    };
    let mbit = |r: &evmm_testhost::net::Iperf3| r.receiver_kbit_s.map(|k| k / 1000.0);
    Some(Figures {
        tcp_guest_to_l1_mbit_s: mbit(tx)?,
        tcp_l1_to_guest_mbit_s: mbit(rx)?,
        udp_rr_p50_us: rr.p50_us,
        udp_rr_p99_us: rr.p99_us,
        // kbit/s of 64-byte payloads: packets per second / 1000.
        udp64_guest_to_l1_kpps: udp.receiver_kbit_s? * 1000.0 / (64.0 * 8.0) / 1000.0,
    })
}

/// The round with the median guest → L1 throughput.
fn median(rounds: &[Figures]) -> Option<Figures> {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(|a, b| {
        a.tcp_guest_to_l1_mbit_s
            .total_cmp(&b.tcp_guest_to_l1_mbit_s)
    });
    sorted.get(sorted.len() / 2).cloned()
}

fn print_table(rows: &[Row], cli: &Cli) {
    println!(
        "| VMM ({} round(s), iperf3 {} s, {} UDP exchanges) | TCP guest → L1 Mbit/s | TCP L1 → guest Mbit/s | UDP RR p50 µs | UDP RR p99 µs | 64-byte UDP guest → L1 kpps |",
        cli.rounds, cli.seconds, cli.requests
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        match &r.median {
            Some(f) => println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |",
                r.vmm,
                f.tcp_guest_to_l1_mbit_s,
                f.tcp_l1_to_guest_mbit_s,
                f.udp_rr_p50_us,
                f.udp_rr_p99_us,
                f.udp64_guest_to_l1_kpps
            ),
            None => println!("| {} | no round completed | | | | |", r.vmm),
        }
    }
    if let (Some(e), Some(q)) = (
        rows.first().and_then(|r| r.median.as_ref()),
        rows.get(1).and_then(|r| r.median.as_ref()),
    ) {
        println!(
            "\nevmm / QEMU: TCP guest → L1 {:.2}×, L1 → guest {:.2}×, UDP RR p50 {:.2}×, 64-byte kpps {:.2}×",
            e.tcp_guest_to_l1_mbit_s / q.tcp_guest_to_l1_mbit_s,
            e.tcp_l1_to_guest_mbit_s / q.tcp_l1_to_guest_mbit_s,
            e.udp_rr_p50_us / q.udp_rr_p50_us,
            e.udp64_guest_to_l1_kpps / q.udp64_guest_to_l1_kpps
        );
    }
}

/// Bars: throughput both ways (Mbit/s) per VMM.
fn plot(svg: &Path, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    let data: Vec<(String, f64, f64)> = rows
        .iter()
        .filter_map(|r| {
            r.median.as_ref().map(|f| {
                (
                    r.vmm.clone(),
                    f.tcp_guest_to_l1_mbit_s,
                    f.tcp_l1_to_guest_mbit_s,
                )
            })
        })
        .collect();
    let ymax = data.iter().map(|d| d.1.max(d.2)).fold(1.0, f64::max) * 1.2;
    let root = SVGBackend::new(svg, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("virtio-net TCP throughput (iperf3)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..(data.len().max(1) as f64), 0.0..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("Mbit/s")
        .draw()?;
    for (i, (name, tx, rx)) in data.iter().enumerate() {
        let x = i as f64;
        for (j, (v, color, label)) in [(tx, BLUE, "guest → L1"), (rx, RED, "L1 → guest")]
            .into_iter()
            .enumerate()
        {
            let x0 = x + 0.15 + 0.35 * j as f64;
            let series = chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x0 + 0.3, *v)],
                color.filled(),
            )))?;
            if i == 0 {
                series.label(label).legend(move |(lx, ly)| {
                    Rectangle::new([(lx, ly - 5), (lx + 15, ly + 5)], color.filled())
                });
            }
        }
        chart.draw_series(std::iter::once(Text::new(
            name.chars().take(40).collect::<String>(),
            (x + 0.05, ymax * 0.95),
            ("sans-serif", 13),
        )))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
