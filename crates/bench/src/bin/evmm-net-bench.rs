//! `evmm-net-bench [--rounds R] [--seconds S] [--requests N] [--out DIR]`: virtio-net
//! on a tap, five ways, alternating round by round, with the same kernel, initramfs,
//! tap set-up and peer: evmm's in-VMM device and QEMU `-M microvm`'s
//! `virtio-net-device` with `vhost=off`; both with the kernel's vhost-net (`vhost=on`);
//! and QEMU's `virtio-net-pci` with vhost-net on microvm's PCIe, whose interrupts go
//! through an irqfd as evmm's do (QEMU's virtio-mmio has none). Measured: TCP
//! throughput guest → L1 and L1 → guest (iperf3), UDP request/response latency
//! (p50/p99, 64-byte datagrams), 64-byte UDP datagrams per second guest → L1 (iperf3
//! -u), and the CPU time the VMM's process and the kernel's vhost workers spent per
//! gigabyte of the two TCP transfers. Prints a markdown table (the median of the
//! rounds, each column on its own) and the ratios, and writes `net.json` and `net.svg`
//! into DIR. Where this host's /dev/kvm cannot boot Linux each run goes to a nested
//! test host of its own (same images, same L1 set-up; the test network exists only
//! there), so one that goes down costs one run, which is made again.

use clap::Parser;
use evmm_testhost::net::{
    evmm_argv_with_metrics, evmm_net_guest, qemu_net_guest, side_fields, QemuNet, Side,
    DEFAULT_MAC, DEFAULT_TAP, METRICS_MARKER,
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
    /// Only the set-ups whose short name (`evmm vhost=off`, `QEMU PCI vhost=on`, ...)
    /// holds this text.
    #[arg(long)]
    only: Option<String>,
}

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
    /// What the guest's iperf3 sent of them.
    udp64_sent_kpps: f64,
    /// CPU time of the VMM's process (all its threads, vCPUs included) per GB of the
    /// two TCP transfers, ms.
    vmm_cpu_ms_per_gb: f64,
    /// CPU time of the kernel's `vhost-<VMM pid>` workers per GB, ms (None: no worker).
    vhost_cpu_ms_per_gb: Option<f64>,
    /// evmm's device counters over the whole run (None: not evmm, or not counted).
    evmm: Option<DeviceRates>,
    /// KVM's counters of the VMM's guest during the 64-byte UDP flood, per datagram
    /// sent (None where L1 has no debugfs).
    udp64_guest: Option<GuestExits>,
}

/// What KVM counted of a guest over an interval, per datagram sent in it.
#[derive(Debug, Clone, Serialize, PartialEq)]
struct GuestExits {
    exits: f64,
    mmio_exits: f64,
    irq_injections: f64,
    halt_exits: f64,
}

impl GuestExits {
    /// From the `kvm_*` fields of two `EVMM-NET-THREADS` lines, per `packets`.
    fn between(
        a: &BTreeMap<String, String>,
        b: &BTreeMap<String, String>,
        packets: f64,
    ) -> Option<Self> {
        let delta = |k: &str| -> Option<f64> {
            let key = format!("kvm_{k}");
            let (x, y): (u64, u64) = (a.get(&key)?.parse().ok()?, b.get(&key)?.parse().ok()?);
            Some(y.saturating_sub(x) as f64 / packets)
        };
        (packets > 0.0).then_some(())?;
        Some(GuestExits {
            exits: delta("exits")?,
            mmio_exits: delta("mmio_exits")?,
            irq_injections: delta("irq_injections")?,
            halt_exits: delta("halt_exits")?,
        })
    }

    /// The median of each field.
    fn median(all: &[&GuestExits]) -> Option<Self> {
        let col = |f: fn(&GuestExits) -> f64| mid(all.iter().map(|r| f(r)).collect());
        Some(GuestExits {
            exits: col(|r| r.exits)?,
            mmio_exits: col(|r| r.mmio_exits)?,
            irq_injections: col(|r| r.irq_injections)?,
            halt_exits: col(|r| r.halt_exits)?,
        })
    }
}

/// evmm's device counters over a whole run, per 1000 frames it moved (both ways).
#[derive(Debug, Clone, Serialize, PartialEq)]
struct DeviceRates {
    frames: f64,
    kicks: f64,
    wakeups: f64,
    interrupts: f64,
    interrupts_suppressed: f64,
}

impl DeviceRates {
    /// From the `EVMM-METRICS-JSON` line in `text`; None without frames.
    fn parse(text: &str) -> Option<Self> {
        let line = text
            .lines()
            .find_map(|l| l.split_once(&format!("{METRICS_MARKER} ")).map(|(_, j)| j))?;
        let m: serde_json::Value = serde_json::from_str(line).ok()?;
        let queues = m["devices"][0]["transport"]["device"]["queues"].as_array()?;
        let sum = |names: &[&str]| -> f64 {
            queues
                .iter()
                .flat_map(|q| names.iter().map(move |n| q[*n].as_u64().unwrap_or(0)))
                .sum::<u64>() as f64
        };
        let frames = sum(&["rx_packets", "tx_packets"]);
        let per_k = |n: f64| n * 1000.0 / frames;
        (frames > 0.0).then(|| DeviceRates {
            frames,
            kicks: per_k(sum(&["rx_kicks", "tx_kicks"])),
            wakeups: per_k(sum(&["wakeups"])),
            interrupts: per_k(sum(&["interrupts"])),
            interrupts_suppressed: per_k(sum(&["interrupts_suppressed"])),
        })
    }

    /// The median of each field over `rates`.
    fn median(rates: &[&DeviceRates]) -> Option<Self> {
        let col = |f: fn(&DeviceRates) -> f64| mid(rates.iter().map(|r| f(r)).collect());
        Some(DeviceRates {
            frames: col(|r| r.frames)?,
            kicks: col(|r| r.kicks)?,
            wakeups: col(|r| r.wakeups)?,
            interrupts: col(|r| r.interrupts)?,
            interrupts_suppressed: col(|r| r.interrupts_suppressed)?,
        })
    }
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
    // Each run boots a nested host of its own where it needs one, so that a nested host
    // that goes down costs one run, not the benchmark.
    bench_main(None, || run(&cli))
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
        .threads(process)
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
            argv: evmm_argv_with_metrics(&evmm_net_guest(&guest, DEFAULT_TAP, &options), images),
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
    eprintln!("{route}");
    let setups: Vec<Setup> = setups(cli, &images)?
        .into_iter()
        .filter(|s| {
            cli.only
                .as_ref()
                .is_none_or(|o| s.short.contains(o.as_str()))
        })
        .collect();
    if setups.is_empty() {
        return Err(format!("no set-up's name holds {:?}", cli.only).into());
    }
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
                let started = std::time::Instant::now();
                let (output, problems) = match route.run(
                    &["sh", "-c", &net_run.script()],
                    // Room for L1 to boot and for the script to end a VMM that overran (its output
                    // then tells what stalled).
                    BOOT_LIMIT + Duration::from_secs(150),
                ) {
                    Ok(out) => {
                        // Attempts that lost the nested host were made again inside the run.
                        if !out.lost_attempts.is_empty() {
                            eprintln!(
                                "round {round}/{}: {}: {}",
                                cli.rounds,
                                setup.name,
                                out.timing()
                            );
                            row.incomplete += out.lost_attempts.len();
                        }
                        let parsed = NetOutput::parse(&out.output);
                        if let Some(f) = figures(&parsed, &out.output, cli.seconds) {
                            eprintln!(
                                "round {round}/{}: {} ({:.0} s): {f:?}",
                                cli.rounds,
                                setup.name,
                                started.elapsed().as_secs_f64()
                            );
                            row.rounds.push(f);
                            break;
                        }
                        (out.output, format!("{:?}", parsed.problems()))
                    }
                    // The nested host itself went down (README, Known problems).
                    Err(e) => (e.to_string(), "the nested host failed".to_string()),
                };
                // In the nested host the guest under either VMM sometimes resets or
                // stalls, and L1 sometimes panics (README, Known problems): the run's
                // output is kept and the run made again.
                let log = cli.out.join(format!(
                    "incomplete-{}-round{round}-attempt{attempt}.log",
                    row.short.replace(['=', ' '], "-")
                ));
                std::fs::write(&log, &output)?;
                eprintln!(
                    "round {round}/{}: {}: attempt {attempt}/{ATTEMPTS} incomplete ({problems}); \
                     its output is in {}",
                    cli.rounds,
                    setup.name,
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
    // kbit/s of 64-byte payloads: packets per second / 1000.
    let kpps = |kbit_s: f64| kbit_s * 1000.0 / (64.0 * 8.0) / 1000.0;
    let (tx_mbit, rx_mbit) = (mbit(tx)?, mbit(rx)?);
    let threads = side_fields(text, "EVMM-NET-THREADS", Side::L1);
    let [before, _, after, after_udp] = threads.as_slice() else {
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
        udp64_guest_to_l1_kpps: kpps(udp.receiver_kbit_s?),
        udp64_sent_kpps: kpps(udp.sender_kbit_s?),
        vmm_cpu_ms_per_gb: per_gb(p1.saturating_sub(p0)),
        vhost_cpu_ms_per_gb: v0.zip(v1).map(|(a, b)| per_gb(b.saturating_sub(a))),
        evmm: DeviceRates::parse(text),
        udp64_guest: GuestExits::between(
            after,
            after_udp,
            kpps(udp.sender_kbit_s?) * 1000.0 * f64::from(seconds),
        ),
    })
}

/// The median of `v` (of the middle two, their mean); None when empty.
fn mid(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The median of each column on its own (of the middle two, their mean).
fn median(rounds: &[Figures]) -> Option<Figures> {
    let col = |f: fn(&Figures) -> f64| mid(rounds.iter().map(f).collect());
    Some(Figures {
        tcp_guest_to_l1_mbit_s: col(|f| f.tcp_guest_to_l1_mbit_s)?,
        tcp_l1_to_guest_mbit_s: col(|f| f.tcp_l1_to_guest_mbit_s)?,
        udp_rr_p50_us: col(|f| f.udp_rr_p50_us)?,
        udp_rr_p99_us: col(|f| f.udp_rr_p99_us)?,
        udp64_guest_to_l1_kpps: col(|f| f.udp64_guest_to_l1_kpps)?,
        udp64_sent_kpps: col(|f| f.udp64_sent_kpps)?,
        vmm_cpu_ms_per_gb: col(|f| f.vmm_cpu_ms_per_gb)?,
        vhost_cpu_ms_per_gb: mid(rounds
            .iter()
            .filter_map(|f| f.vhost_cpu_ms_per_gb)
            .collect()),
        evmm: DeviceRates::median(
            &rounds
                .iter()
                .filter_map(|f| f.evmm.as_ref())
                .collect::<Vec<_>>(),
        ),
        udp64_guest: GuestExits::median(
            &rounds
                .iter()
                .filter_map(|f| f.udp64_guest.as_ref())
                .collect::<Vec<_>>(),
        ),
    })
}

fn print_table(rows: &[Row], cli: &Cli) {
    println!(
        "| VMM ({} round(s), iperf3 {} s, {} UDP exchanges) | TCP guest → L1 Mbit/s | TCP L1 → guest Mbit/s | UDP RR p50 µs | UDP RR p99 µs | 64-byte UDP guest → L1 kpps received (sent) | VMM process CPU ms/GB | vhost worker CPU ms/GB |",
        cli.rounds, cli.seconds, cli.requests
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        match &r.median {
            Some(f) => println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} ({:.1}) | {:.0} | {} |",
                r.vmm,
                f.tcp_guest_to_l1_mbit_s,
                f.tcp_l1_to_guest_mbit_s,
                f.udp_rr_p50_us,
                f.udp_rr_p99_us,
                f.udp64_guest_to_l1_kpps,
                f.udp64_sent_kpps,
                f.vmm_cpu_ms_per_gb,
                f.vhost_cpu_ms_per_gb
                    .map_or("-".to_string(), |v| format!("{v:.0}"))
            ),
            None => println!("| {} | no round completed | | | | | | |", r.vmm),
        }
    }
    let m = |short: &str| {
        rows.iter()
            .find(|r| r.short == short)
            .and_then(|r| r.median.as_ref())
    };
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
        (
            "in-VMM / QEMU vhost=off",
            m("evmm vhost=off"),
            m("QEMU vhost=off"),
        ),
        (
            "vhost=on / QEMU vhost=on",
            m("evmm vhost=on"),
            m("QEMU vhost=on"),
        ),
        (
            "vhost=on / QEMU PCI vhost=on",
            m("evmm vhost=on"),
            m("QEMU PCI vhost=on"),
        ),
    ] {
        if let (Some(e), Some(q)) = (e, q) {
            println!("evmm {label}: {}", ratios(e, q));
        }
    }
    let counted: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let d = r.median.as_ref()?.evmm.as_ref()?;
            Some(format!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                r.vmm, d.frames, d.kicks, d.wakeups, d.interrupts, d.interrupts_suppressed
            ))
        })
        .collect();
    let exits: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let g = r.median.as_ref()?.udp64_guest.as_ref()?;
            Some(format!(
                "| {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                r.vmm, g.exits, g.mmio_exits, g.irq_injections, g.halt_exits
            ))
        })
        .collect();
    if !exits.is_empty() {
        println!("KVM's counters of the guest during the 64-byte UDP flood, per datagram sent:\n");
        println!("| VMM | exits | MMIO exits | interrupts injected | HLT exits |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for line in exits {
            println!("{line}");
        }
        println!();
    }
    if !counted.is_empty() {
        println!("evmm's device counters over each whole run, per 1000 frames moved:\n");
        println!(
            "| VMM | frames | guest kicks | worker wake-ups | interrupts | interrupts suppressed |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        for line in counted {
            println!("{line}");
        }
        println!();
    }
    if let (Some(v), Some(i)) = (m("evmm vhost=on"), m("evmm vhost=off")) {
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
            udp64_sent_kpps: 2.0,
            vmm_cpu_ms_per_gb: 10.0,
            vhost_cpu_ms_per_gb: vhost,
            evmm: None,
            udp64_guest: None,
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
EVMM-NET-THREADS side=l1 process=evmm pid=7 threads=evmm,vcpu0 cpu_us=3000000 vhost_kthreads=vhost-3,vhost-7 vhost_cpu_us=5000,250000 kvm_exits=1000 kvm_mmio_exits=500 kvm_io_exits=0 kvm_irq_injections=100 kvm_halt_exits=10 kvm_halt_wakeup=10 ok=1
EVMM-NET-IPERF3 side=guest role=client target=5207 status=0 sender_kbit_s=5120 receiver_kbit_s=5120 retransmits=- ok=1
EVMM-NET-THREADS side=l1 process=evmm pid=7 threads=evmm,vcpu0 cpu_us=3000000 vhost_kthreads=vhost-3,vhost-7 vhost_cpu_us=5000,250000 kvm_exits=101000 kvm_mmio_exits=50500 kvm_io_exits=0 kvm_irq_injections=25100 kvm_halt_exits=5010 kvm_halt_wakeup=10 ok=1
";

    #[test]
    fn figures_of_a_run() {
        let out = NetOutput::parse(RUN);
        let f = figures(&out, RUN, 5).unwrap();
        assert_eq!(f.tcp_guest_to_l1_mbit_s, 400.0);
        assert_eq!(f.udp_rr_p50_us, 2000.0);
        assert_eq!((f.udp64_guest_to_l1_kpps, f.udp64_sent_kpps), (10.0, 10.0));
        // 10 kpps for 5 s: 50,000 datagrams, over which KVM counted 100,000 exits.
        let g = f.udp64_guest.as_ref().unwrap();
        assert_eq!(
            (g.exits, g.mmio_exits, g.irq_injections, g.halt_exits),
            (2.0, 1.0, 0.5, 0.1)
        );
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

    #[test]
    fn evmm_counters_per_thousand_frames() {
        let text =
            "console\nEVMM-METRICS-JSON {\"devices\":[{\"transport\":{\"device\":{\"queues\":[\
                    {\"rx_packets\":600,\"tx_packets\":400,\"rx_kicks\":10,\"tx_kicks\":90,\
                    \"wakeups\":150,\"interrupts\":300,\"interrupts_suppressed\":50}]}}}]}\n";
        let d = DeviceRates::parse(text).unwrap();
        assert_eq!(d.frames, 1000.0);
        assert_eq!(
            (d.kicks, d.wakeups, d.interrupts, d.interrupts_suppressed),
            (100.0, 150.0, 300.0, 50.0)
        );
        assert_eq!(DeviceRates::parse("no counters"), None);
        let none_moved = text.replace("600", "0").replace("400", "0");
        assert_eq!(DeviceRates::parse(&none_moved), None);
    }
}
