//! `evmm-notify-trace [--requests N] [--out DIR]`: where the time of a kick goes,
//! stage by stage. Runs the notify guest (crates/notify-guest, virtio-blk) on each
//! path twice, once as it is and once with the host's tracepoints recorded
//! ([`evmm_bench::tracefs`]: kvm_emulate_insn, kvm_exit, kvm_entry, kvm_mmio,
//! kvm_fast_mmio, kvm_set_irq, kvm_msi_set_irq, kvm_inj_virq, kvm_userspace_exit,
//! sched_waking, sched_switch, and the return from the wait system calls, on the host
//! TSC), cuts every interrupted request into
//! its stages ([`evmm_bench::kick_stages`]), and prints per path the p50/p90/p99 of
//! each stage, their sum against the traced and untraced end-to-end figures (the
//! tracing's own cost), and draws a swimlane of the typical (median) request per path.
//! Paths: evmm (ioeventfd + irqfd), evmm `--notify exit`, evmm + evmm-vhost-user-blk,
//! QEMU microvm. Needs root (tracefs). benches/notify-trace runs it.
//!
//! Clocks: every stage boundary is a host tracepoint on the host TSC (`trace_clock`
//! `x86-tsc`); the guest's own figures are its TSC, which runs at the host's rate
//! (KVM's guest TSC is the host's plus a constant offset), so the two compare as
//! durations without converting instants. Requests are matched by their QueueNotify
//! writes, in order; a polled request (no interrupt) has no stages and is left out.

use clap::Parser;
use evmm_bench::kick_stages::{requests, Anchors, Request, STAGES};
use evmm_bench::notify_run::{guest_elf, TempDisk};
use evmm_bench::tracefs::{parse, TraceInstance};
use evmm_testhost::notify_output::{NotifyRun, Stats};
use evmm_testhost::process::{run_with_limit, slug};
use evmm_testhost::qemu::notify_guest_microvm_argv;
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::bench_main;
use evmm_testhost::{Backend, BackendKind};
use plotters::prelude::*;
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
    /// Requests per series (the guest runs 8 series; half of them interrupt).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=2000))]
    requests: u32,
    /// Where the JSON, the picture and the consoles go.
    #[arg(long, default_value = "target/notify-trace")]
    out: PathBuf,
}

/// The system calls a consumer returns from when a kick wakes it (x86-64 numbers:
/// poll, epoll_wait, pselect6, ppoll, epoll_pwait, epoll_pwait2): their `sys_exit`
/// marks it running even when no `sched_switch` to it is traced.
const WAIT_EXITS: &str = "id == 7 || id == 232 || id == 270 || id == 271 || id == 281 || id == 441";

const TRACEPOINTS: [&str; 12] = [
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
/// Per-CPU trace buffer.
const BUFFER_KB: u32 = 65536;

/// A path and where its device sits.
struct TracePath {
    name: &'static str,
    argv: Vec<String>,
    backend: Option<BackendKind>,
    notify_gpa: &'static str,
    gsi: u32,
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
    lost_events: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(None, || run(&cli))
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&cli.out)?;
    let guest = guest_elf(cli.guest.as_deref())?;
    let disk_file = TempDisk::new("evmm-notify-trace", 64 << 20, &cli.out)?;
    let disk = disk_file.path().to_path_buf();
    let socket = cli.out.join("vhost-user-blk.sock");
    let cpu = kvm_cpu_model()?;
    let tsc_mhz = tsc_mhz()?;
    let mut reports = Vec::new();
    let mut typical = Vec::new();
    for p in paths(cli, &guest, &disk, &socket, &cpu.model) {
        eprintln!("{}: untraced, then traced", p.name);
        let untraced = run_guest(&p, &disk, &socket, None, cli)?;
        let trace = TraceInstance::new(&TRACEPOINTS, BUFFER_KB)?;
        trace.filter("raw_syscalls/sys_exit", WAIT_EXITS)?;
        let traced = run_guest(&p, &disk, &socket, Some(&trace), cli)?;
        let text = trace.text()?;
        let lost = trace.overruns();
        drop(trace);
        std::fs::write(cli.out.join(format!("{}.trace", slug(p.name))), &text)?;
        let events = parse(&text);
        let vcpu_tid = busiest_kicker(&events, p.notify_gpa).ok_or_else(|| {
            format!(
                "{}: no QueueNotify write to {} in the trace",
                p.name, p.notify_gpa
            )
        })?;
        let reqs = requests(
            &events,
            &Anchors {
                vcpu_tid,
                notify_gpa: p.notify_gpa.into(),
                gsi: p.gsi,
            },
        );
        let matched = with_guest_marks(&reqs, &traced);
        if matched.is_empty() {
            return Err(format!(
                "{}: no GET_ID request with all its stages in the trace ({} with stages)",
                p.name,
                reqs.len()
            )
            .into());
        }
        let untraced_p50 = untraced
            .series("get_id", "irq")
            .and_then(|s| Stats::of(&s.cycles))
            .map_or(0.0, |s| s.p50 / tsc_mhz);
        let report = report(p.name, &matched, tsc_mhz, untraced_p50, lost);
        typical.push((p.name, median_request(&matched)));
        reports.push(report);
    }
    print_tables(&reports);
    let json = cli.out.join("notify-trace.json");
    std::fs::write(&json, serde_json::to_string_pretty(&reports)?)?;
    let svg = cli.out.join("notify-trace.svg");
    swimlanes(&svg, &typical, tsc_mhz)?;
    eprintln!("wrote {}, {} and the traces", json.display(), svg.display());
    Ok(())
}

fn paths(cli: &Cli, guest: &Path, disk: &Path, socket: &Path, cpu: &str) -> Vec<TracePath> {
    let g = guest.display().to_string();
    let d = disk.display().to_string();
    let cmdline = format!("notify.requests={}", cli.requests);
    let evmm = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "evmm",
            "--kernel",
            &g,
            "--memory",
            "256",
            "--cmdline",
            &cmdline,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let disk_arg = format!("path={d},id={GUEST_ID},poll=off");
    let socket_arg = format!("socket={}", socket.display());
    vec![
        TracePath {
            name: "evmm ioeventfd + irqfd",
            argv: evmm(&["--disk", &disk_arg]),
            backend: None,
            notify_gpa: "0xc0000050",
            gsi: 5,
        },
        TracePath {
            name: "evmm --notify exit",
            argv: evmm(&["--disk", &disk_arg, "--notify", "exit"]),
            backend: None,
            notify_gpa: "0xc0000050",
            gsi: 5,
        },
        TracePath {
            name: "evmm + evmm-vhost-user-blk",
            argv: evmm(&["--vhost-user-blk", &socket_arg]),
            backend: Some(BackendKind::Evmm),
            notify_gpa: "0xc0000050",
            gsi: 5,
        },
        TracePath {
            name: "QEMU microvm",
            argv: notify_guest_microvm_argv(cpu, &g, &d, GUEST_ID, cli.requests, 256),
            backend: None,
            notify_gpa: "0xfeb02e50",
            gsi: 47,
        },
    ]
}

/// One run of the guest on `p` (its backend started first), recording into `trace`
/// while it runs when given.
fn run_guest(
    p: &TracePath,
    disk: &Path,
    socket: &Path,
    trace: Option<&TraceInstance>,
    cli: &Cli,
) -> Result<NotifyRun, Box<dyn std::error::Error>> {
    let _backend = p
        .backend
        .map(|kind| {
            let mut argv = kind.argv(
                &disk.display().to_string(),
                &socket.display().to_string(),
                1,
            );
            if kind == BackendKind::Evmm {
                argv.extend(["--poll".into(), "off".into()]);
            }
            Backend::spawn(kind, &argv, socket, None)
        })
        .transpose()?;
    if let Some(t) = trace {
        t.record(true)?;
    }
    let out = run_with_limit(&p.argv, RUN_LIMIT);
    if let Some(t) = trace {
        t.record(false)?;
    }
    let out = out?;
    let tag = if trace.is_some() {
        "traced"
    } else {
        "untraced"
    };
    std::fs::write(
        cli.out.join(format!("{}-{tag}.console", slug(p.name))),
        &out.stdout,
    )?;
    let run = NotifyRun::parse(&out.stdout);
    if out.status.map(|s| s.success()) != Some(true) || run.done != Some(u64::from(cli.requests)) {
        return Err(format!(
            "{} ({tag}) did not complete ({:?}, errors {:?}); console in {}",
            p.name,
            out.status,
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

/// A request of the GET_ID interrupt pass with the guest's own kick → handler figure
/// (cycles) of the same request.
#[derive(Debug, Clone)]
struct Matched {
    host: Request,
    guest: u64,
}

impl Matched {
    /// The stages, the guest's first: from its start mark (just before the store) to
    /// KVM seeing the store (trap and emulation), the rest of its figure.
    fn stages(&self) -> [u64; 6] {
        let h = self.host.stages();
        [
            self.guest.saturating_sub(self.host.total()),
            h[0],
            h[1],
            h[2],
            h[3],
            h[4],
        ]
    }
}

/// Pairs the traced requests of the GET_ID interrupt pass with the guest's samples of
/// that pass, by their QueueNotify write: the pass's first kick follows the poll
/// pass's (its `kicks=`), and each request kicks once.
fn with_guest_marks(reqs: &[Request], traced: &NotifyRun) -> Vec<Matched> {
    let (Some(poll), Some(irq)) = (
        traced.series("get_id", "poll"),
        traced.series("get_id", "irq"),
    ) else {
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
const ALL_STAGES: [&str; 6] = [
    "store", STAGES[0], STAGES[1], STAGES[2], STAGES[3], STAGES[4],
];

fn report(
    name: &str,
    reqs: &[Matched],
    tsc_mhz: f64,
    guest_untraced_p50_us: f64,
    lost_events: u64,
) -> PathReport {
    let us = |v: f64| v / tsc_mhz;
    let mut stages = Vec::new();
    let mut sum = 0.0;
    for (i, stage) in ALL_STAGES.iter().enumerate() {
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

fn print_tables(reports: &[PathReport]) {
    println!("\nWhere a kick's time goes, stage by stage (host tracepoints; GET_ID requests with an interrupt), µs\n");
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
    println!("\n| path | requests | sum of stage p50s | guest's kick → handler p50, traced | the same, untraced | tracing's cost | events lost |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in reports {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:+.1} | {} |",
            r.path,
            r.requests,
            r.sum_of_p50s_us,
            r.traced_total_p50_us,
            r.guest_untraced_p50_us,
            r.traced_total_p50_us - r.guest_untraced_p50_us,
            r.lost_events
        );
    }
    println!(
        "\nStages: store = from the guest's start mark (its TSC just before the QueueNotify store) until KVM sees the store \
         (the guest's figure less the host's stages); signal = until the consumer is woken \
         (the ioeventfd's eventfd_signal, or evmm's vCPU thread after an exit); wakeup = until it runs; \
         work = until it raises the interrupt (wakes the kworker of an irqfd, or calls kvm_set_irq); \
         inject = until kvm_set_irq; deliver = until the guest's handler runs."
    );
}

/// One panel per path: the median request's stages as boxes in the lane of the thread
/// that spends them, with the stage's time written on it.
fn swimlanes(
    svg: &Path,
    typical: &[(&str, Matched)],
    tsc_mhz: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    const LANES: [&str; 5] = [
        "guest (vCPU)",
        "KVM (vCPU thread)",
        "consumer",
        "kworker (irqfd)",
        "guest handler",
    ];
    // The lane each stage runs in.
    const STAGE_LANE: [usize; 6] = [0, 1, 2, 2, 3, 4];
    let panel_h = 190;
    let height = (panel_h * typical.len().max(1)) as u32 + 20;
    let root = SVGBackend::new(svg, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((typical.len().max(1), 1));
    for ((name, req), area) in typical.iter().zip(panels.iter()) {
        let total = req.guest as f64 / tsc_mhz;
        let lengths = req.stages();
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{name}: a median request, {total:.1} µs from the guest's kick to its handler"
                ),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(25)
            .y_label_area_size(140)
            .build_cartesian_2d(0.0..total.max(1.0) * 1.02, 0.0..LANES.len() as f64)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .y_labels(LANES.len() + 1)
            .y_label_formatter(&|y| {
                (LANES.len())
                    .checked_sub(1 + *y as usize)
                    .and_then(|i| LANES.get(i))
                    .map_or(String::new(), |s| s.to_string())
            })
            .x_desc("µs since the guest's kick")
            .draw()?;
        let mut at = 0u64;
        for (i, stage) in ALL_STAGES.iter().enumerate() {
            let x0 = at as f64 / tsc_mhz;
            at += lengths[i];
            let x1 = at as f64 / tsc_mhz;
            let lane = (LANES.len() - 1 - STAGE_LANE[i]) as f64;
            let color = Palette99::pick(i).mix(0.6);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, lane + 0.2), (x1.max(x0 + total * 0.003), lane + 0.8)],
                color.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{stage} {:.1}", x1 - x0),
                (x0, lane + 0.85 - 0.25 * (i % 2) as f64),
                ("sans-serif", 12),
            )))?;
            if i + 1 < ALL_STAGES.len() && STAGE_LANE[i + 1] != STAGE_LANE[i] {
                let next = (LANES.len() - 1 - STAGE_LANE[i + 1]) as f64;
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(x1, lane + 0.5), (x1, next + 0.5)],
                    BLACK.stroke_width(1),
                )))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

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
            tsc: [0, 1, 2, 3, 4, total],
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
        let m = with_guest_marks(&reqs, &run);
        let pairs: Vec<(usize, u64)> = m.iter().map(|m| (m.host.kick, m.guest)).collect();
        // Kick 5's sample timed out; kick 6 is past the pass.
        assert_eq!(pairs, [(3, 100), (4, 200)]);
    }
}
