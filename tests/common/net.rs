//! Network runs in the nested host (or on this host's KVM where it boots Linux): a VMM
//! with a network device on a tap, the guest's checks (`guest-images/guest/tests/net`)
//! and their peer in L1 (`evmm-net-peer`), run by `evmm_testhost::net`.

use evmm_guest_tools::net::stream_sha256;
use evmm_testhost::guest::all_marker_fields;
use evmm_testhost::net::{evmm_argv_with_metrics, evmm_net_guest, Side, DEFAULT_TAP, GUEST_IFACE};
use evmm_testhost::{GuestConsole, GuestImages, NetOutput, NetPlan, NetRun, Route};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// On the direct route both tests would make the same tap on this host: one at a time.
static ONE_TAP: Mutex<()> = Mutex::new(());

/// Runs `vmm` (a VMM booting the stock guest with a network device on the default
/// tap) in one network run with `plan` on both sides, the tap of MTU `tap_mtu`
/// (multi-queue if asked); checks that the run as a whole went well (the guest test
/// passed, every check of both sides passed, the VMM and the peer exited 0, no module
/// failed to load) and returns the output and its parse.
pub fn run(
    vmm: Vec<String>,
    plan: &NetPlan,
    tap_mtu: u32,
    multi_queue: bool,
) -> (String, NetOutput) {
    try_run(vmm, plan, tap_mtu, multi_queue, 3).unwrap_or_else(|e| panic!("{e}"))
}

/// As [`run`] with at most `attempts` nested attempts (1 for a caller that retries
/// itself), returning what went wrong instead of panicking. A run whose guest ended
/// without its result while the VMM exited 0 (the silent L2 reset of README's Known
/// problems, seen under QEMU as under evmm) is printed and made again, within the
/// same number of attempts.
pub fn try_run(
    vmm: Vec<String>,
    plan: &NetPlan,
    tap_mtu: u32,
    multi_queue: bool,
    attempts: u32,
) -> Result<(String, NetOutput), String> {
    let _one = ONE_TAP.lock().unwrap_or_else(|e| e.into_inner());
    let attempts = attempts.max(1);
    let mut attempt = 1;
    loop {
        match run_once(&vmm, plan, tap_mtu, multi_queue, attempts) {
            Err(Failure::SilentGuestEnd(text)) if attempt < attempts => {
                eprintln!(
                    "attempt {attempt} of {attempts}: the guest ended without its result and \
                     the VMM exited 0 (a silent L2 reset, README Known problems); again"
                );
                eprintln!("{}", last_lines(&text, 15));
                attempt += 1;
            }
            Err(Failure::SilentGuestEnd(text)) => {
                return Err(format!(
                    "the guest ended without its result and the VMM exited 0 in each of \
                     {attempts} attempts; output:\n{text}"
                ))
            }
            Err(Failure::Other(e)) => return Err(e),
            Ok(out) => return Ok(out),
        }
    }
}

/// Why one network run failed.
enum Failure {
    /// The guest started, printed no result, and the VMM exited 0: it reset.
    SilentGuestEnd(String),
    /// Anything else, with the output.
    Other(String),
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn run_once(
    vmm: &[String],
    plan: &NetPlan,
    tap_mtu: u32,
    multi_queue: bool,
    attempts: u32,
) -> Result<(String, NetOutput), Failure> {
    let route = Route::detect().map_err(|e| Failure::Other(e.to_string()))?;
    eprintln!("{route}");
    let mut run = NetRun::new(vmm.to_vec(), plan.peer.clone()).for_route(&route);
    run.tap.mtu = tap_mtu;
    run.tap.multi_queue = multi_queue;
    let started = Instant::now();
    let out = route
        .run_attempts(
            &["sh", "-c", &run.script()],
            Duration::from_secs(900),
            attempts,
        )
        .map_err(|e| Failure::Other(format!("the run failed: {e}")))?;
    eprintln!(
        "network run: {:.1} s in all ({})",
        started.elapsed().as_secs_f64(),
        out.timing()
    );
    let text = out.output;
    for line in text.lines().filter(|l| l.contains("EVMM-NET-")) {
        eprintln!("{}", line.trim_end());
    }
    let fail = |what: String| Err(Failure::Other(format!("{what}; output:\n{text}")));
    if out.status != 0 {
        return fail("the run's script failed".into());
    }
    let console = GuestConsole::parse(&text);
    if !console.started {
        return fail("the guest did not start".into());
    }
    if text.contains("EVMM-GUEST-WARN") {
        let warnings = all_marker_fields(&text, "EVMM-GUEST-WARN");
        return fail(format!("a guest module did not load ({warnings:?})"));
    }
    let parsed = NetOutput::parse(&text);
    if parsed.guest_ended_silently(&console) {
        return Err(Failure::SilentGuestEnd(text));
    }
    if !parsed.problems().is_empty() {
        return fail(format!("{:?}", parsed.problems()));
    }
    if !console.passed("net") {
        return fail("the guest's checks failed".into());
    }
    let passed = (parsed.passed(Side::Guest), parsed.passed(Side::L1));
    if passed != (plan.guest.len(), plan.peer.len()) {
        return fail(format!(
            "{passed:?} checks passed of {:?}",
            (plan.guest.len(), plan.peer.len())
        ));
    }
    Ok((text, parsed))
}

pub fn assert_pings(net: &NetOutput, text: &str, side: Side, size: Option<u32>, count: u32) {
    let p = net
        .ping_from(side, size)
        .unwrap_or_else(|| panic!("no ping from {side:?} of {size:?}; output:\n{text}"));
    assert!(p.ok && p.sent == count && p.received == count, "{p:?}");
    assert_eq!(p.dst, side.other().ip().to_string());
    eprintln!(
        "ping {} -> {} ({} bytes, DF): {count}/{count}, p50 {:.0} us",
        side.as_str(),
        p.dst,
        p.size,
        p.p50_us
    );
}

/// The tap's counters after the run (the last `EVMM-NET-STATS` of L1).
pub fn tap_counter(net: &NetOutput, text: &str, counter: &str) -> u64 {
    let (_, tap) = net
        .stats
        .iter()
        .rev()
        .find(|(side, f)| {
            *side == Side::L1 && f.get("iface").map(String::as_str) == Some(DEFAULT_TAP)
        })
        .unwrap_or_else(|| panic!("no tap counters; output:\n{text}"));
    tap[counter].parse().unwrap()
}

/// The evmm command of a network run: `--net tap=...,mac=MAC,OPTIONS`, the extra evmm
/// options, `--metrics`, and the metrics printed after the console.
pub fn evmm_vmm(
    plan: &NetPlan,
    mac: &str,
    net_options: &[&str],
    extra: &[&str],
    cpus: u32,
) -> Vec<String> {
    let images = GuestImages::build().unwrap_or_else(|e| panic!("{e}"));
    let mut options = vec![format!("mac={mac}")];
    options.extend(net_options.iter().map(|s| s.to_string()));
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    let mut guest = evmm_net_guest(&plan.guest, DEFAULT_TAP, &options);
    guest.cpus = cpus;
    guest.extra.extend(extra.iter().map(|s| s.to_string()));
    evmm_argv_with_metrics(&guest, &images)
}

/// The guest's `eth0` has `mac`, its link up and a carrier; its MTU.
pub fn assert_link(net: &NetOutput, text: &str, mac: &str) -> u32 {
    let link = net
        .links
        .iter()
        .find(|l| l.side == Side::Guest && l.iface == GUEST_IFACE)
        .unwrap_or_else(|| panic!("no link line; output:\n{text}"));
    assert_eq!(link.mac, mac);
    assert!(link.carrier && link.operstate == "up", "{link:?}");
    link.mtu
}

/// Both TCP transfers of `mib` MiB (L1 to the guest, the guest to L1) arrived whole:
/// the same SHA-256 at both ends, equal to the stream's; `label` goes before each
/// transfer's line.
pub fn assert_transfers(net: &NetOutput, text: &str, mib: u64, label: &str) {
    let expected = stream_sha256(1, mib * super::MIB);
    for from in [Side::L1, Side::Guest] {
        let pair = net
            .transfer_from(from, mib * super::MIB)
            .unwrap_or_else(|| panic!("no transfer from {from:?}; output:\n{text}"));
        assert!(pair.matched(), "{pair:?}");
        assert_eq!(pair.receiver.sha256, expected, "{pair:?}");
        assert_eq!(pair.receiver.bad_bytes, 0);
        eprintln!(
            "{label}: TCP {} -> {}: {mib} MiB, sha256 {}... at both ends, {:.1} Mbit/s at the receiver",
            from.as_str(),
            pair.receiver.side.as_str(),
            &expected[..16],
            pair.receiver.mbit_s
        );
    }
    assert!(net.unpaired_transfers().is_empty(), "output:\n{text}");
}

/// Counter `name` of each queue pair of the network device (the only device).
pub fn per_pair(m: &serde_json::Value, name: &str) -> Vec<u64> {
    let dev = &m["devices"][0];
    assert!(
        dev["kind"] == "virtio-net" || dev["kind"] == "vhost-net",
        "not a network device: {m}"
    );
    dev["transport"]["device"]["queues"]
        .as_array()
        .unwrap_or_else(|| panic!("no queues: {m}"))
        .iter()
        .map(|q| {
            q[name]
                .as_u64()
                .unwrap_or_else(|| panic!("no {name} in {q}"))
        })
        .collect()
}
