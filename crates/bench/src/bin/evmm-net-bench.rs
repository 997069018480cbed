//! `evmm-net-bench [--rounds R] [--seconds S] [--requests N] [--out DIR]`: virtio-net
//! on a tap, four ways in one run, alternating round by round, same kernel, initramfs,
//! tap set-up and peer: evmm's in-VMM device and QEMU `-M microvm`'s
//! `virtio-net-device` with `vhost=off`, then both with the kernel's vhost-net
//! (`vhost=on`), and QEMU's `virtio-net-pci` with vhost-net on microvm's PCIe (whose
//! interrupts go through an irqfd, as evmm's do; QEMU's virtio-mmio has none). Measured: TCP throughput guest → L1 and L1 → guest (iperf3), UDP
//! request/response latency (p50/p99, 64-byte datagrams), 64-byte UDP datagrams per
//! second guest → L1 (iperf3 -u), and the CPU time the VMM's process and the kernel's
//! vhost workers spent per gigabyte of the two TCP transfers. Prints a markdown table
//! (the median of the rounds, each column on its own) and the ratios, and writes
//! `net.json` and `net.svg` into DIR. It runs itself in the nested test host where this
//! host's /dev/kvm cannot boot Linux (every row in the same L1; the test network exists
//! only there).

use clap::Parser;
use evmm_testhost::net::{
    evmm_net_guest, qemu_net_guest, side_fields, QemuNet, Side, DEFAULT_MAC, DEFAULT_TAP,
};
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::bench_main;
use evmm_testhost::{GuestImages, NetOutput, NetPlan, NetRun, Route};
use plotters::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// virtio-net throughput, latency and CPU cost: evmm and QEMU microvm, without and with
/// vhost-net, side by side.
#[derive(Parser)]
struct Cli {
    /// Boots of each set-up (each column shows the median).
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
/// Runs of one set-up in one round before it counts as failed.
const ATTEMPTS: usize = 3;
/// Longest one run may take (a run takes about a minute in the nested host; a guest
/// that stalls is killed and the run made again).
const BOOT_LIMIT: Duration = Duration::from_secs(300);

/// One round's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
struct Figures {
    tcp_guest_to_l1_mbit_s: f64,
    tcp_l1_to_guest_mbit_s: f64,
    udp_rr_p50_us: f64,
    udp_rr_p99_us: f64,
    udp64_guest_to_l1_kpps: f64,
    /// CPU time of the VMM's process (all its threads, vCPUs included) per GB of the
    /// two TCP transfers, ms.
    vmm_cpu_ms_per_gb: f64,
    /// CPU time of the kernel's `vhost-<VMM pid>` workers per GB, ms (None: no worker).
    vhost_cpu_ms_per_gb: Option<f64>,
}

/// One VMM set-up.
struct Setup {
    name: String,
    /// The name in the plot.
    short: String,
    /// Its process's name in L1 (`comm`).
    process: &'static str,
    argv: Vec<String>,
}

#[derive(Serialize)]
struct Row {
    vmm: String,
    short: String,
    /// Runs that gave no figures (and were run again).
    incomplete: usize,
    rounds: Vec<Figures>,
    median: Option<Figures>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(Some(NESTED_LIMIT), || run(&cli))
}

/// The checks: the latency first (an idle link), then the TCP transfers with the VMM's
/// and the vhost workers' CPU time read before, between and after them, then the
/// small-packet rate.
fn plan(cli: &Cli, process: &str) -> NetPlan {
    let s = cli.seconds;
    NetPlan::new()
        .link_up(DEFAULT_MAC, 1500)
        .udp_rr(Side::Guest, cli.requests, Some(64))
        .threads(process)
        .iperf3(Side::Guest, s, &[])
        .threads(process)
        .iperf3(Side::Guest, s, &["-R"])
        .threads(process)
        .iperf3(Side::Guest, s, &["-u", "-l", "64", "-b", "0"])
}

fn setups(cli: &Cli, images: &GuestImages) -> Result<Vec<Setup>, Box<dyn std::error::Error>> {
    let cpu = kvm_cpu_model()?;
    let mac = format!("mac={DEFAULT_MAC}");
    let mut out = Vec::new();
    for vhost in [false, true] {
        let on_off = if vhost { "on" } else { "off" };
        let guest = plan(cli, "evmm").guest;
        let mut options = vec![mac.as_str()];
        let vhost_option = format!("vhost={on_off}");
        if vhost {
            options.push(&vhost_option);
        }
        out.push(Setup {
            name: if vhost {
                "evmm, vhost=on (kernel vhost-net)".into()
            } else {
                "evmm, in-VMM virtio-net".into()
            },
            short: format!("evmm vhost={on_off}"),
            process: "evmm",
            argv: evmm_net_guest(&guest, DEFAULT_TAP, &options).argv(images),
        });
        let qemu = QemuNet {
            vhost,
            ..QemuNet::default()
        };
        out.push(Setup {
            name: format!(
                "QEMU -M microvm (-cpu {}), virtio-net-device vhost={on_off}",
                cpu.model
            ),
            short: format!("QEMU vhost={on_off}"),
            process: QEMU_COMM,
            argv: qemu_net_guest(&guest, &qemu).argv(images),
        });
    }
    // The same kernel data path with QEMU's interrupts through an irqfd, which its
    // virtio-mmio transport never uses: virtio-net-pci (MSI-X) on microvm's PCIe.
    let pci = QemuNet {
        vhost: true,
        pci: true,
        ..QemuNet::default()
    };
    out.push(Setup {
        name: format!(
            "QEMU -M microvm,pcie=on (-cpu {}), virtio-net-pci vhost=on",
            cpu.model
        ),
        short: "QEMU PCI vhost=on".into(),
        process: QEMU_COMM,
        argv: qemu_net_guest(&plan(cli, QEMU_COMM).guest, &pci).argv(images),
    });
    Ok(out)
}

/// QEMU's process name in L1 (`comm` keeps 15 bytes of `qemu-system-x86_64`).
const QEMU_COMM: &str = "qemu-system-x86";

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&cli.out)?;
    let images = GuestImages::existing()?;
    let route = Route::detect()?;
    let setups = setups(cli, &images)?;
    let mut rows: Vec<Row> = setups
        .iter()
        .map(|s| Row {
            vmm: s.name.clone(),
            short: s.short.clone(),
            incomplete: 0,
            rounds: Vec::new(),
            median: None,
        })
        .collect();
    for round in 1..=cli.rounds {
        for (setup, row) in setups.iter().zip(&mut rows) {
            let peer = plan(cli, setup.process).peer;
            let mut net_run = NetRun::new(setup.argv.clone(), peer).for_route(&route);
            net_run.vmm_limit = BOOT_LIMIT;
            for attempt in 1..=ATTEMPTS {
                let out = route.run(
                    &["sh", "-c", &net_run.script()],
                    BOOT_LIMIT + Duration::from_secs(60),
                )?;
                let parsed = NetOutput::parse(&out.output);
                if let Some(f) = figures(&parsed, &out.output, cli.seconds) {
                    eprintln!("round {round}/{}: {}: {f:?}", cli.rounds, setup.name);
                    row.rounds.push(f);
                    break;
                }
                // The guest under either VMM sometimes resets mid-run in the nested host
                // (README, Known problems): the run's output is kept and the round is
                // run again.
                let log = cli.out.join(format!(
                    "incomplete-{}-round{round}-attempt{attempt}.log",
                    row.short.replace(['=', ' '], "-")
                ));
                std::fs::write(&log, &out.output)?;
                eprintln!(
                    "round {round}/{}: {}: attempt {attempt}/{ATTEMPTS} incomplete ({:?}); \
                     its output is in {}",
                    cli.rounds,
                    setup.name,
                    parsed.problems(),
                    log.display()
                );
                row.incomplete += 1;
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

/// CPU time in one `EVMM-NET-THREADS` line: the process's, and its vhost workers'
/// (`vhost-<pid>`), µs.
fn cpu_us(line: &BTreeMap<String, String>) -> Option<(u64, Option<u64>)> {
    let process: u64 = line.get("cpu_us")?.parse().ok()?;
    let worker = format!("vhost-{}", line.get("pid")?);
    let names = line.get("vhost_kthreads")?.split(',');
    let times = line.get("vhost_cpu_us")?.split(',');
    let ours: Vec<u64> = names
        .zip(times)
        .filter(|(n, _)| *n == worker)
        .filter_map(|(_, t)| t.parse().ok())
        .collect();
    Some((process, (!ours.is_empty()).then(|| ours.iter().sum())))
}

/// The figures of one run, when every measurement is there.
fn figures(out: &NetOutput, text: &str, seconds: u32) -> Option<Figures> {
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
    let (tx_mbit, rx_mbit) = (mbit(tx)?, mbit(rx)?);
    let threads = side_fields(text, "EVMM-NET-THREADS", Side::L1);
    let [before, _, after] = threads.as_slice() else {
        return None;
    };
    let ((p0, v0), (p1, v1)) = (cpu_us(before)?, cpu_us(after)?);
    // Bytes of both transfers: their rates times their durations.
    let gb = (tx_mbit + rx_mbit) * 1e6 / 8.0 * f64::from(seconds) / 1e9;
    let per_gb = |us: u64| us as f64 / 1000.0 / gb;
    Some(Figures {
        tcp_guest_to_l1_mbit_s: tx_mbit,
        tcp_l1_to_guest_mbit_s: rx_mbit,
        udp_rr_p50_us: rr.p50_us,
        udp_rr_p99_us: rr.p99_us,
        // kbit/s of 64-byte payloads: packets per second / 1000.
        udp64_guest_to_l1_kpps: udp.receiver_kbit_s? * 1000.0 / (64.0 * 8.0) / 1000.0,
        vmm_cpu_ms_per_gb: per_gb(p1.saturating_sub(p0)),
        vhost_cpu_ms_per_gb: v0.zip(v1).map(|(a, b)| per_gb(b.saturating_sub(a))),
    })
}

/// The median of each column on its own (of the middle two, their mean).
fn median(rounds: &[Figures]) -> Option<Figures> {
    fn mid(mut v: Vec<f64>) -> Option<f64> {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }
    let col = |f: fn(&Figures) -> f64| mid(rounds.iter().map(f).collect());
    Some(Figures {
        tcp_guest_to_l1_mbit_s: col(|f| f.tcp_guest_to_l1_mbit_s)?,
        tcp_l1_to_guest_mbit_s: col(|f| f.tcp_l1_to_guest_mbit_s)?,
        udp_rr_p50_us: col(|f| f.udp_rr_p50_us)?,
        udp_rr_p99_us: col(|f| f.udp_rr_p99_us)?,
        udp64_guest_to_l1_kpps: col(|f| f.udp64_guest_to_l1_kpps)?,
        vmm_cpu_ms_per_gb: col(|f| f.vmm_cpu_ms_per_gb)?,
        vhost_cpu_ms_per_gb: mid(rounds
            .iter()
            .filter_map(|f| f.vhost_cpu_ms_per_gb)
            .collect()),
    })
}

fn print_table(rows: &[Row], cli: &Cli) {
    println!(
        "| VMM ({} round(s), iperf3 {} s, {} UDP exchanges) | TCP guest → L1 Mbit/s | TCP L1 → guest Mbit/s | UDP RR p50 µs | UDP RR p99 µs | 64-byte UDP guest → L1 kpps | VMM process CPU ms/GB | vhost worker CPU ms/GB |",
        cli.rounds, cli.seconds, cli.requests
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        match &r.median {
            Some(f) => println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {} |",
                r.vmm,
                f.tcp_guest_to_l1_mbit_s,
                f.tcp_l1_to_guest_mbit_s,
                f.udp_rr_p50_us,
                f.udp_rr_p99_us,
                f.udp64_guest_to_l1_kpps,
                f.vmm_cpu_ms_per_gb,
                f.vhost_cpu_ms_per_gb
                    .map_or("-".to_string(), |v| format!("{v:.0}"))
            ),
            None => println!("| {} | no round completed | | | | | | |", r.vmm),
        }
    }
    let m = |i: usize| rows.get(i).and_then(|r| r.median.as_ref());
    println!();
    let again: Vec<String> = rows
        .iter()
        .filter(|r| r.incomplete > 0)
        .map(|r| format!("{} {}", r.short, r.incomplete))
        .collect();
    if !again.is_empty() {
        println!(
            "runs that were incomplete and ran again: {}\n",
            again.join(", ")
        );
    }
    for (label, e, q) in [
        ("in-VMM / QEMU vhost=off", m(0), m(1)),
        ("vhost=on / QEMU vhost=on", m(2), m(3)),
        ("vhost=on / QEMU PCI vhost=on", m(2), m(4)),
    ] {
        if let (Some(e), Some(q)) = (e, q) {
            println!("evmm {label}: {}", ratios(e, q));
        }
    }
    if let (Some(v), Some(i)) = (m(2), m(0)) {
        println!(
            "evmm vhost=on / evmm in-VMM: UDP RR p50 {:.2}×, TCP guest → L1 {:.2}×, L1 → guest {:.2}×",
            v.udp_rr_p50_us / i.udp_rr_p50_us,
            v.tcp_guest_to_l1_mbit_s / i.tcp_guest_to_l1_mbit_s,
            v.tcp_l1_to_guest_mbit_s / i.tcp_l1_to_guest_mbit_s
        );
    }
}

/// `a / b` column by column.
fn ratios(a: &Figures, b: &Figures) -> String {
    format!(
        "TCP guest → L1 {:.2}×, L1 → guest {:.2}×, UDP RR p50 {:.2}×, p99 {:.2}×, 64-byte kpps {:.2}×, VMM CPU/GB {:.2}×",
        a.tcp_guest_to_l1_mbit_s / b.tcp_guest_to_l1_mbit_s,
        a.tcp_l1_to_guest_mbit_s / b.tcp_l1_to_guest_mbit_s,
        a.udp_rr_p50_us / b.udp_rr_p50_us,
        a.udp_rr_p99_us / b.udp_rr_p99_us,
        a.udp64_guest_to_l1_kpps / b.udp64_guest_to_l1_kpps,
        a.vmm_cpu_ms_per_gb / b.vmm_cpu_ms_per_gb
    )
}

/// Bars: throughput both ways (Mbit/s) per VMM.
fn plot(svg: &Path, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    let data: Vec<(String, f64, f64)> = rows
        .iter()
        .filter_map(|r| {
            r.median.as_ref().map(|f| {
                (
                    r.short.clone(),
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
            name.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn f(tx: f64, p50: f64, vhost: Option<f64>) -> Figures {
        Figures {
            tcp_guest_to_l1_mbit_s: tx,
            tcp_l1_to_guest_mbit_s: 2.0 * tx,
            udp_rr_p50_us: p50,
            udp_rr_p99_us: 3.0 * p50,
            udp64_guest_to_l1_kpps: 1.0,
            vmm_cpu_ms_per_gb: 10.0,
            vhost_cpu_ms_per_gb: vhost,
        }
    }

    #[test]
    fn each_column_has_its_own_median() {
        let m = median(&[
            f(300.0, 10.0, None),
            f(100.0, 30.0, None),
            f(200.0, 20.0, None),
        ])
        .unwrap();
        assert_eq!((m.tcp_guest_to_l1_mbit_s, m.udp_rr_p50_us), (200.0, 20.0));
        assert_eq!(m.vhost_cpu_ms_per_gb, None);
        let m = median(&[f(100.0, 40.0, Some(4.0)), f(300.0, 10.0, Some(2.0))]).unwrap();
        assert_eq!((m.tcp_guest_to_l1_mbit_s, m.udp_rr_p50_us), (200.0, 25.0));
        assert_eq!(m.vhost_cpu_ms_per_gb, Some(3.0));
        assert_eq!(median(&[]), None);
    }

    const RUN: &str = "\
EVMM-NET-UDP-RR side=guest dst=198.18.0.1 port=5201 size=64 count=10 received=10 lost=0 p50_us=2000 p90_us=2500 p99_us=4000 min_us=1 max_us=5000 mean_us=2100 ok=1
EVMM-NET-THREADS side=l1 process=evmm pid=7 threads=evmm,vcpu0 cpu_us=1000000 vhost_kthreads=vhost-3,vhost-7 vhost_cpu_us=999,50000 ok=1
EVMM-NET-IPERF3 side=guest role=client target=5203 status=0 sender_kbit_s=400000 receiver_kbit_s=400000 retransmits=0 ok=1
EVMM-NET-THREADS side=l1 process=evmm pid=7 threads=evmm,vcpu0 cpu_us=2000000 vhost_kthreads=vhost-3,vhost-7 vhost_cpu_us=999,60000 ok=1
EVMM-NET-IPERF3 side=guest role=client target=5205 status=0 sender_kbit_s=400000 receiver_kbit_s=400000 retransmits=0 ok=1
EVMM-NET-THREADS side=l1 process=evmm pid=7 threads=evmm,vcpu0 cpu_us=3000000 vhost_kthreads=vhost-3,vhost-7 vhost_cpu_us=5000,250000 ok=1
EVMM-NET-IPERF3 side=guest role=client target=5207 status=0 sender_kbit_s=5120 receiver_kbit_s=5120 retransmits=- ok=1
";

    #[test]
    fn figures_of_a_run() {
        let out = NetOutput::parse(RUN);
        let f = figures(&out, RUN, 5).unwrap();
        assert_eq!(f.tcp_guest_to_l1_mbit_s, 400.0);
        assert_eq!(f.udp_rr_p50_us, 2000.0);
        assert_eq!(f.udp64_guest_to_l1_kpps, 10.0);
        // 800 Mbit/s for 5 s is 0.5 GB; 2 s of the process's CPU and 0.2 s of its
        // own vhost worker's (not vhost-3's) over it.
        assert!((f.vmm_cpu_ms_per_gb - 4000.0).abs() < 1e-6, "{f:?}");
        assert!(
            (f.vhost_cpu_ms_per_gb.unwrap() - 400.0).abs() < 1e-6,
            "{f:?}"
        );
        let no_vhost = RUN.replace("vhost-7", "vhost-8");
        let f = figures(&NetOutput::parse(&no_vhost), &no_vhost, 5).unwrap();
        assert_eq!(f.vhost_cpu_ms_per_gb, None);
        let short = RUN.replace("EVMM-NET-THREADS", "X");
        assert_eq!(figures(&NetOutput::parse(&short), &short, 5), None);
    }
}
