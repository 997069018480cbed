//! `evmm-notify-trace [--requests N] [--out DIR] [--only blk|net|both] [--here]`: where
//! the time of a kick goes, stage by stage. Runs the notify guest (crates/notify-guest)
//! on each path twice, once as it is and once with the host's tracepoints recorded
//! ([`evmm_bench::tracefs`]: kvm_emulate_insn, kvm_exit, kvm_entry, kvm_mmio,
//! kvm_fast_mmio, kvm_set_irq, kvm_msi_set_irq, kvm_inj_virq, kvm_userspace_exit,
//! sched_waking, sched_switch, the return from the wait system calls, the entry of
//! write and ioctl, and frames crossing the tap (netif_receive_skb, netif_rx,
//! net_dev_queue), on the host TSC), cuts every interrupted request into its stages ([`evmm_bench::kick_stages`]),
//! and prints per path the p50/p90/p99 of each stage, their sum against the traced and
//! untraced end-to-end figures (the tracing's own cost), and draws a swimlane of the
//! typical (median) request per path ([`evmm_bench::swimlane`]).
//!
//! Disk paths (virtio-blk GET_ID): evmm (ioeventfd + irqfd), evmm `--notify exit`,
//! evmm + evmm-vhost-user-blk, QEMU microvm. Network paths (the guest's net mode: a
//! UDP frame on TX, `evmm-net-echo` answering it on the tap's other side, in a network
//! namespace of the run's own): evmm's in-VMM worker, evmm `--notify exit`, evmm
//! `vhost=on` (the kernel's vhost worker), QEMU microvm `vhost=off` and `vhost=on`.
//! The vhost paths need /dev/vhost-net: unless `--here`, the network paths run again
//! in the nested test host, where it exists, with their own table and picture.
//! Needs root (tracefs). benches/notify-trace runs it.
//!
//! Clocks: every stage boundary is a host tracepoint on the host TSC (`trace_clock`
//! `x86-tsc`); the guest's own figures are its TSC, which runs at the host's rate
//! (KVM's guest TSC is the host's plus a constant offset), so the two compare as
//! durations without converting instants. Requests are matched by their kicks
//! (QueueNotify writes of the request queue), in order; a polled request (no
//! interrupt) has no stages and is left out.

use clap::{Parser, ValueEnum};
use evmm_bench::kick_stages::{requests, Anchors, Request};
use evmm_bench::notify_run::{guest_elf, host_label, rerun_with_vhost_net, vhost_net, TempDisk};
use evmm_bench::swimlane::{self, Panel};
use evmm_bench::tracefs::{parse, TraceInstance};
use evmm_testhost::echo_netns;
use evmm_testhost::notify_output::{NotifyRun, Stats};
use evmm_testhost::process::{run_with_limit, slug};
use evmm_testhost::qemu::{notify_guest_microvm_argv, notify_guest_microvm_net_argv};
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::{bench_main, write_output};
use evmm_testhost::{Backend, BackendKind};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The stage table of every notify path, from the host's tracepoints.
#[derive(Parser)]
struct Cli {
    /// The notify guest; default: built from crates/notify-guest.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Requests per series (the guest runs a poll pass and an interrupt pass).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=2000))]
    requests: u32,
    /// Where the JSON, the picture and the consoles go.
    #[arg(long, default_value = "target/notify-trace")]
    out: PathBuf,
    /// Which devices' paths: the disk's, the network's, or both.
    #[arg(long, value_enum, default_value_t = Only::Both)]
    only: Only,
    /// Only this host's paths: no nested run for the kernel's vhost-net path.
    #[arg(long)]
    here: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    Blk,
    Net,
    Both,
}

/// The system calls a consumer returns from when a kick wakes it (x86-64 numbers:
/// poll, epoll_wait, pselect6, ppoll, epoll_pwait, epoll_pwait2): their `sys_exit`
/// marks it running even when no `sched_switch` to it is traced.
const WAIT_EXITS: &str = "id == 7 || id == 232 || id == 270 || id == 271 || id == 281 || id == 441";

/// The tracepoints of frames crossing a network device, kept for the tap only: a
/// frame entering the host's stack from it, and one queued on it.
const TAP_EVENTS: [&str; 3] = ["net/netif_receive_skb", "net/netif_rx", "net/net_dev_queue"];

/// The system calls that raise an interrupt: write (an irqfd) and ioctl
/// (`KVM_IRQ_LINE`); their `sys_enter` ends a consumer's work.
const RAISE_ENTERS: &str = "id == 1 || id == 16";

const TRACEPOINTS: [&str; 16] = [
    "net/netif_receive_skb",
    "net/netif_rx",
    "net/net_dev_queue",
    "raw_syscalls/sys_enter",
    "raw_syscalls/sys_exit",
    "kvm/kvm_emulate_insn",
    "kvm/kvm_exit",
    "kvm/kvm_entry",
    "kvm/kvm_mmio",
    "kvm/kvm_fast_mmio",
    "kvm/kvm_set_irq",
    "kvm/kvm_msi_set_irq",
    "kvm/kvm_inj_virq",
    "kvm/kvm_userspace_exit",
    "sched/sched_waking",
    "sched/sched_switch",
];
const GUEST_ID: &str = "notify-id";
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// Longest the nested run may take.
const NESTED_LIMIT: Duration = Duration::from_secs(2400);
/// Per-CPU trace buffer.
const BUFFER_KB: u32 = 65536;
/// The tap of the network paths (in a network namespace of each run's own).
const TAP: &str = "evmmn0";
/// The program answering each frame on the tap's other side.
const ECHO: &str = "evmm-net-echo";
/// evmm's first virtio-mmio window and GSI; QEMU microvm's window the guests use.
const EVMM_NOTIFY: (&str, u32) = ("0xc0000050", 5);
const QEMU_NOTIFY: (&str, u32) = ("0xfeb02e50", 47);

/// Where a path's device sits and what serves it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Device {
    /// virtio-blk, maybe through a vhost-user backend started first.
    Blk(Option<BackendKind>),
    /// virtio-net on a tap, `evmm-net-echo` answering on its other side.
    Net,
}

impl Device {
    /// The guest's series of the request kind: (kind, poll pass, interrupt pass).
    fn series(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Device::Blk(_) => ("get_id", "poll", "irq"),
            Device::Net => ("udp_echo", "kick", "rx_irq"),
        }
    }
}

/// A path and where its device sits.
struct TracePath {
    name: &'static str,
    argv: Vec<String>,
    device: Device,
    notify: (&'static str, u32),
    /// Only where /dev/vhost-net exists.
    needs_vhost_net: bool,
}

impl TracePath {
    fn anchors(&self, vcpu_tid: u32) -> Anchors {
        let net = self.device == Device::Net;
        Anchors {
            vcpu_tid,
            notify_gpa: self.notify.0.into(),
            // The transmit queue's kicks; the receive queue's refills are not requests.
            notify_val: net.then_some(1),
            gsi: self.notify.1,
            echo: net.then(|| ECHO.to_string()),
        }
    }
}

#[derive(Serialize)]
struct StageStats {
    stage: &'static str,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
}

#[derive(Serialize)]
struct PathReport {
    path: String,
    consumer: String,
    requests: usize,
    stages: Vec<StageStats>,
    sum_of_p50s_us: f64,
    /// The guest's kick → handler p50 of the traced requests.
    traced_total_p50_us: f64,
    /// The same in the run without tracing.
    guest_untraced_p50_us: f64,
    /// Requests whose host stages took longer than the guest's own kick → handler
    /// figure: a cut that cannot be right (paired with the wrong kick, or clocks that
    /// disagree); their store stage is 0.
    cut_longer_than_guest: usize,
    lost_events: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(None, || run(&cli))
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&cli.out)?;
    let guest = guest_elf(cli.guest.as_deref())?;
    let host = host_label("paths");
    let in_nested_host = host == "nested";
    trace_here(cli, &guest, host, in_nested_host)?;
    if cli.here || in_nested_host || cli.only == Only::Blk {
        return Ok(());
    }
    eprintln!("now the network paths in the nested test host, where /dev/vhost-net exists");
    let args: Vec<String> = vec![
        "--requests".into(),
        cli.requests.to_string(),
        "--out".into(),
        cli.out.display().to_string(),
        "--only".into(),
        "net".into(),
    ];
    rerun_with_vhost_net("evmm-notify-trace", &args, &guest, NESTED_LIMIT)
}

/// Every selected path of this host, untraced then traced; the tables, the JSON and
/// the swimlanes (`notify-trace.*`, `notify-trace-nested.*` in the nested host).
fn trace_here(
    cli: &Cli,
    guest: &Path,
    host: &str,
    must_have_vhost: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let vhost_net = vhost_net(must_have_vhost)?;
    let disk_file = TempDisk::new("evmm-notify-trace", 64 << 20, &cli.out)?;
    let disk = disk_file.path().to_path_buf();
    let socket = cli.out.join("vhost-user-blk.sock");
    let cpu = kvm_cpu_model()?;
    let tsc_mhz = tsc_mhz()?;
    let mut reports = Vec::new();
    let mut typical = Vec::new();
    let all = paths(cli, guest, &disk, &cpu.model);
    let total = all.len();
    for (i, p) in all.iter().enumerate() {
        if p.needs_vhost_net && !vhost_net {
            eprintln!(
                "[{}/{total}] {}: not here (no /dev/vhost-net; the nested run has it)",
                i + 1,
                p.name
            );
            continue;
        }
        eprintln!("[{}/{total}] {}: untraced, then traced", i + 1, p.name);
        let untraced = run_guest(p, &disk, &socket, None, cli, host)?;
        let trace = TraceInstance::new(&TRACEPOINTS, BUFFER_KB)?;
        trace.filter("raw_syscalls/sys_exit", WAIT_EXITS)?;
        trace.filter("raw_syscalls/sys_enter", RAISE_ENTERS)?;
        for event in TAP_EVENTS {
            trace.filter(event, &format!("name == \"{TAP}\""))?;
        }
        let traced = run_guest(p, &disk, &socket, Some(&trace), cli, host)?;
        let text = trace.text()?;
        let lost = trace.overruns();
        drop(trace);
        std::fs::write(
            cli.out.join(format!("{host}-{}.trace", slug(p.name))),
            &text,
        )?;
        let events = parse(&text);
        let vcpu_tid = busiest_kicker(&events, p.notify.0).ok_or_else(|| {
            format!(
                "{}: no QueueNotify write to {} in the trace",
                p.name, p.notify.0
            )
        })?;
        let anchors = p.anchors(vcpu_tid);
        let reqs = requests(&events, &anchors);
        let matched = with_guest_marks(&reqs, &traced, p.device);
        if matched.is_empty() {
            return Err(format!(
                "{}: no request of the interrupt pass with all its stages in the trace ({} with stages)",
                p.name,
                reqs.len()
            )
            .into());
        }
        let (kind, _, irq) = p.device.series();
        let untraced_p50 = untraced
            .series(kind, irq)
            .and_then(|s| Stats::of(&s.cycles))
            .map_or(0.0, |s| s.p50 / tsc_mhz);
        let names = anchors.stage_names();
        reports.push(report(p.name, names, &matched, tsc_mhz, untraced_p50, lost));
        let median = median_request(&matched);
        typical.push(Panel {
            name: p.name.to_string(),
            stages: stage_names_with_store(names)
                .into_iter()
                .zip(median.stages())
                .map(|(n, c)| (n, c as f64 / tsc_mhz))
                .collect(),
        });
    }
    print_tables(host, &reports);
    let suffix = if host == "nested" { "-nested" } else { "" };
    let json = cli.out.join(format!("notify-trace{suffix}.json"));
    write_output(&json, serde_json::to_string_pretty(&reports)?.as_bytes())?;
    let svg = cli.out.join(format!("notify-trace{suffix}.svg"));
    swimlane::draw(&svg, &typical)?;
    write_output(&svg, &std::fs::read(&svg)?)?;
    eprintln!("wrote {}, {} and the traces", json.display(), svg.display());
    Ok(())
}

fn paths(cli: &Cli, guest: &Path, disk: &Path, cpu: &str) -> Vec<TracePath> {
    let g = guest.display().to_string();
    let d = disk.display().to_string();
    let blk_cmdline = format!("notify.requests={}", cli.requests);
    let net_cmdline = format!("notify.net=1 notify.requests={}", cli.requests);
    let evmm = |cmdline: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "evmm",
            "--kernel",
            &g,
            "--memory",
            "256",
            "--cmdline",
            cmdline,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let disk_arg = format!("path={d},id={GUEST_ID},poll=off");
    let socket_arg = format!("socket={}", cli.out.join("vhost-user-blk.sock").display());
    let tap = format!("tap={TAP}");
    let tap_vhost = format!("tap={TAP},vhost=on");
    let path = |name, argv, device, notify, needs_vhost_net| TracePath {
        name,
        argv,
        device,
        notify,
        needs_vhost_net,
    };
    let mut v = Vec::new();
    if cli.only != Only::Net {
        v.extend([
            path(
                "evmm ioeventfd + irqfd",
                evmm(&blk_cmdline, &["--disk", &disk_arg]),
                Device::Blk(None),
                EVMM_NOTIFY,
                false,
            ),
            path(
                "evmm --notify exit",
                evmm(&blk_cmdline, &["--disk", &disk_arg, "--notify", "exit"]),
                Device::Blk(None),
                EVMM_NOTIFY,
                false,
            ),
            path(
                "evmm + evmm-vhost-user-blk",
                evmm(&blk_cmdline, &["--vhost-user-blk", &socket_arg]),
                Device::Blk(Some(BackendKind::Evmm)),
                EVMM_NOTIFY,
                false,
            ),
            path(
                "QEMU microvm",
                notify_guest_microvm_argv(cpu, &g, &d, GUEST_ID, cli.requests, 256),
                Device::Blk(None),
                QEMU_NOTIFY,
                false,
            ),
        ]);
    }
    if cli.only != Only::Blk {
        let qemu = |vhost| notify_guest_microvm_net_argv(&g, TAP, vhost, cli.requests, 256);
        v.extend([
            path(
                "net: evmm in-VMM worker",
                evmm(&net_cmdline, &["--net", &tap]),
                Device::Net,
                EVMM_NOTIFY,
                false,
            ),
            path(
                "net: evmm --notify exit",
                evmm(&net_cmdline, &["--net", &tap, "--notify", "exit"]),
                Device::Net,
                EVMM_NOTIFY,
                false,
            ),
            path(
                "net: evmm vhost=on (kernel vhost-net)",
                evmm(&net_cmdline, &["--net", &tap_vhost]),
                Device::Net,
                EVMM_NOTIFY,
                true,
            ),
            path(
                "net: QEMU microvm, vhost=off",
                qemu(false),
                Device::Net,
                QEMU_NOTIFY,
                false,
            ),
            path(
                "net: QEMU microvm, vhost=on",
                qemu(true),
                Device::Net,
                QEMU_NOTIFY,
                true,
            ),
        ]);
    }
    v
}

/// One run of the guest on `p` (its backend started first, or in a network namespace
/// of its own with the echo on the tap's other side), recording into `trace` while
/// it runs when given.
fn run_guest(
    p: &TracePath,
    disk: &Path,
    socket: &Path,
    trace: Option<&TraceInstance>,
    cli: &Cli,
    host: &str,
) -> Result<NotifyRun, Box<dyn std::error::Error>> {
    let backend = match p.device {
        Device::Blk(Some(kind)) => {
            let mut argv = kind.argv(
                &disk.display().to_string(),
                &socket.display().to_string(),
                1,
            );
            if kind == BackendKind::Evmm {
                argv.extend(["--poll".into(), "off".into()]);
            }
            Some(Backend::spawn(kind, &argv, socket, None)?)
        }
        _ => None,
    };
    if let Some(t) = trace {
        t.record(true)?;
    }
    let out = match p.device {
        Device::Blk(_) => run_with_limit(&p.argv, RUN_LIMIT)
            .map_err(|e| e.to_string())
            .map(|o| (o.stdout, o.status.map(|s| s.success()) == Some(true))),
        Device::Net => echo_netns::run(TAP, &p.argv, RUN_LIMIT, None)
            .map(|r| (r.console, r.vmm_status == Some(0))),
    };
    if let Some(t) = trace {
        t.record(false)?;
    }
    drop(backend);
    let (console, ok) = out.map_err(|e| format!("{}: {e}", p.name))?;
    let tag = if trace.is_some() {
        "traced"
    } else {
        "untraced"
    };
    std::fs::write(
        cli.out
            .join(format!("{host}-{}-{tag}.console", slug(p.name))),
        &console,
    )?;
    let run = NotifyRun::parse(&console);
    if !ok || run.done != Some(u64::from(cli.requests)) {
        return Err(format!(
            "{} ({tag}) did not complete (errors {:?}); console in {}",
            p.name,
            run.errors,
            cli.out.display()
        )
        .into());
    }
    Ok(run)
}

/// The thread that wrote the QueueNotify address most often: the vCPU.
fn busiest_kicker(events: &[evmm_bench::tracefs::Event], gpa: &str) -> Option<u32> {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    let needle = format!("gpa {gpa}");
    for e in events {
        if (e.name == "kvm_mmio" || e.name == "kvm_fast_mmio") && e.fields.contains(&needle) {
            *counts.entry(e.tid).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(tid, _)| tid)
}

/// A request of the interrupt pass with the guest's own kick → handler figure
/// (cycles) of the same request.
#[derive(Debug, Clone)]
struct Matched {
    host: Request,
    guest: u64,
}

impl Matched {
    /// The stages, the guest's first: from its start mark (just before the store) to
    /// KVM seeing the store (trap and emulation), the rest of its figure.
    fn stages(&self) -> Vec<u64> {
        let mut v = vec![self.guest.saturating_sub(self.host.total())];
        v.extend(self.host.stages());
        v
    }
}

/// Pairs the traced requests of the interrupt pass with the guest's samples of that
/// pass, by their kicks: the pass's first kick follows the poll pass's (its
/// `kicks=`), and each request kicks once.
fn with_guest_marks(reqs: &[Request], traced: &NotifyRun, device: Device) -> Vec<Matched> {
    let (kind, poll, irq) = device.series();
    let (Some(poll), Some(irq)) = (traced.series(kind, poll), traced.series(kind, irq)) else {
        return Vec::new();
    };
    let first = poll.kicks.unwrap_or(0) as usize;
    if irq.kicks != Some(irq.cycles.len() as u64) {
        // Kicks skipped (a polling device): requests and kicks do not pair up.
        return Vec::new();
    }
    reqs.iter()
        .filter_map(|r| {
            let i = r.kick.checked_sub(first)?;
            let guest = *irq.cycles.get(i)?;
            (guest != u64::from(u32::MAX)).then(|| Matched {
                host: r.clone(),
                guest,
            })
        })
        .collect()
}

/// The stage names of the table: the guest's first.
fn stage_names_with_store(host: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec!["store"];
    v.extend_from_slice(host);
    v
}

fn report(
    name: &str,
    host_stages: &[&'static str],
    reqs: &[Matched],
    tsc_mhz: f64,
    guest_untraced_p50_us: f64,
    lost_events: u64,
) -> PathReport {
    let us = |v: f64| v / tsc_mhz;
    let mut stages = Vec::new();
    let mut sum = 0.0;
    for (i, stage) in stage_names_with_store(host_stages).into_iter().enumerate() {
        let s = Stats::of(&reqs.iter().map(|r| r.stages()[i]).collect::<Vec<_>>())
            .expect("at least one request");
        sum += us(s.p50);
        stages.push(StageStats {
            stage,
            p50_us: us(s.p50),
            p90_us: us(s.p90),
            p99_us: us(s.p99),
        });
    }
    let total =
        Stats::of(&reqs.iter().map(|r| r.guest).collect::<Vec<_>>()).expect("at least one request");
    PathReport {
        path: name.to_string(),
        consumer: most_common(reqs.iter().map(|r| r.host.consumer.as_str())),
        requests: reqs.len(),
        stages,
        sum_of_p50s_us: sum,
        traced_total_p50_us: us(total.p50),
        guest_untraced_p50_us,
        cut_longer_than_guest: reqs.iter().filter(|r| r.host.total() > r.guest).count(),
        lost_events,
    }
}

fn most_common<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for n in names {
        *counts.entry(n).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, c)| *c)
        .map_or_else(String::new, |(n, _)| n.to_string())
}

/// The request whose end-to-end time is the median.
fn median_request(reqs: &[Matched]) -> Matched {
    let mut sorted: Vec<&Matched> = reqs.iter().collect();
    sorted.sort_by_key(|r| r.guest);
    sorted[sorted.len() / 2].clone()
}

/// The wide table of one set of stages: a row per path, `p50 (p90)` per stage.
fn print_wide(reports: &[&PathReport]) {
    let Some(first) = reports.first() else {
        return;
    };
    let names: Vec<&str> = first.stages.iter().map(|s| s.stage).collect();
    println!(
        "\n| path | {} | sum | guest, traced | guest, untraced |",
        names.join(" | ")
    );
    println!(
        "| --- |{} ---: | ---: | ---: |",
        " ---: |".repeat(names.len())
    );
    for r in reports {
        let cells: Vec<String> = r
            .stages
            .iter()
            .map(|s| format!("{:.1} ({:.1})", s.p50_us, s.p90_us))
            .collect();
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            r.path,
            cells.join(" | "),
            r.sum_of_p50s_us,
            r.traced_total_p50_us,
            r.guest_untraced_p50_us
        );
    }
}

fn print_tables(host: &str, reports: &[PathReport]) {
    println!(
        "\nWhere a kick's time goes, stage by stage ({host} host; host tracepoints; requests with an interrupt), µs\n"
    );
    println!("| path | consumer | stage | p50 | p90 | p99 |");
    println!("| --- | --- | --- | ---: | ---: | ---: |");
    for r in reports {
        for s in &r.stages {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                r.path, r.consumer, s.stage, s.p50_us, s.p90_us, s.p99_us
            );
        }
    }
    println!("\n| path | requests | cut longer than the guest's figure | sum of stage p50s | guest's kick → handler p50, traced | the same, untraced | tracing's cost | events lost |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in reports {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:+.1} | {} |",
            r.path,
            r.requests,
            r.cut_longer_than_guest,
            r.sum_of_p50s_us,
            r.traced_total_p50_us,
            r.guest_untraced_p50_us,
            r.traced_total_p50_us - r.guest_untraced_p50_us,
            r.lost_events
        );
    }
    println!("\np50 (p90) of each stage, µs:");
    let (blk, net): (Vec<&PathReport>, Vec<&PathReport>) = reports
        .iter()
        .partition(|r| r.stages.len() == STORE_AND_BLK_STAGES);
    print_wide(&blk);
    print_wide(&net);
    println!(
        "\nStages: store = from the guest's start mark (its TSC just before the QueueNotify store) until KVM sees the store \
         (the guest's figure less the host's stages); signal = until the consumer is woken \
         (the ioeventfd's eventfd_signal, or evmm's vCPU thread after an exit); wakeup = until it runs; \
         work = until it enters the system call that raises the interrupt (write of the irqfd, KVM_IRQ_LINE; \
         a kernel thread has none) or wakes a relay that raises it (QEMU's loop for a vhost worker); \
         raise = until the interrupt is raised (the kworker of an irqfd woken, or kvm_set_irq); \
         on the network path work is tx (until the frame enters the host's stack from the tap), echo wakeup (until \
         the echo runs), echo (until its answer is queued on the tap), rx wakeup (until the consumer runs again) and rx; \
         inject = until kvm_set_irq; deliver = until the guest's handler runs."
    );
}

/// The disk path's stages with the guest's store.
const STORE_AND_BLK_STAGES: usize = evmm_bench::kick_stages::STAGES.len() + 1;

/// The host's TSC rate in MHz, from KVM's view of it (the probe guest's `tsc_khz`).
fn tsc_mhz() -> Result<f64, Box<dyn std::error::Error>> {
    let out = run_with_limit(
        &[
            "evmm-notify-floor",
            "--requests",
            "10",
            "--mode",
            "poll",
            "--no-samples",
        ],
        Duration::from_secs(60),
    )?;
    NotifyRun::parse(&out.stdout)
        .tsc_khz
        .map(|k| k as f64 / 1000.0)
        .ok_or_else(|| "evmm-notify-floor did not report the TSC rate".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_kicker_is_the_vcpu() {
        let events = parse(
            "vcpu0-7 [001] ..... 1: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x0\n\
             vcpu0-7 [001] ..... 2: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x0\n\
             other-8 [000] ..... 3: kvm_mmio: mmio write len 4 gpa 0xc0000050 val 0x0\n\
             x-9 [000] ..... 4: kvm_mmio: mmio write len 4 gpa 0xfee00080 val 0x0\n",
        );
        assert_eq!(busiest_kicker(&events, "0xc0000050"), Some(7));
        assert_eq!(busiest_kicker(&events, "0x1"), None);
    }

    fn req(kick: usize, total: u64, c: &str) -> Request {
        Request {
            kick,
            tsc: vec![0, 1, 2, 3, 4, total],
            consumer: c.into(),
        }
    }

    #[test]
    fn the_median_request_and_the_commonest_consumer() {
        let m = |guest: u64, c: &str| Matched {
            host: req(0, 5, c),
            guest,
        };
        let reqs = [m(10, "a"), m(30, "b"), m(20, "b")];
        assert_eq!(median_request(&reqs).guest, 20);
        assert_eq!(
            most_common(reqs.iter().map(|r| r.host.consumer.as_str())),
            "b"
        );
        // The guest's stage is the rest of its figure.
        assert_eq!(m(12, "a").stages(), [7, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn requests_pair_with_the_guest_s_samples_of_the_interrupt_pass() {
        let console = "NOTIFY-RESULT kind=get_id mode=poll n=3 irqs=0 kicks=3 errors=0 cycles=1,1,1\n\
                       NOTIFY-RESULT kind=get_id mode=irq n=3 irqs=3 kicks=3 errors=0 cycles=100,200,4294967295\n";
        let run = NotifyRun::parse(console);
        // Kicks 0-2: the poll pass (no stages); 3-5: the interrupt pass; 6: a read.
        let reqs = [
            req(3, 50, "w"),
            req(5, 60, "w"),
            req(6, 70, "w"),
            req(4, 80, "w"),
        ];
        let m = with_guest_marks(&reqs, &run, Device::Blk(None));
        let pairs: Vec<(usize, u64)> = m.iter().map(|m| (m.host.kick, m.guest)).collect();
        // Kick 5's sample timed out; kick 6 is past the pass.
        assert_eq!(pairs, [(3, 100), (4, 200)]);
    }
}
