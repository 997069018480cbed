//! KVM level, network: the notify guest (crates/notify-guest) in its net mode sends
//! its UDP probe frames through evmm's virtio-net device (ioeventfd, and `--notify
//! exit`) and through QEMU microvm's `virtio-net-device`, to `evmm-net-echo` on the
//! tap, in a network namespace each run makes for itself; every frame comes back
//! (the guest checks each echo's sequence number), every series is complete, and the
//! counters of both ends agree. The raw floor (`evmm-notify-floor --tap`) goes
//! through the same tap and echo. The guest measures in its ring 3, so this runs on
//! this host's /dev/kvm, PVM or not. Needs root (namespaces, taps, packet sockets).

use evmm_testhost::echo_netns;
use evmm_testhost::images::target_dir;
use evmm_testhost::notify_output::NotifyRun;
use evmm_testhost::qemu::notify_guest_microvm_net_argv;
use std::path::PathBuf;
use std::time::Duration;

const N: u64 = 200;
const TAP: &str = "evmmn0";
const LIMIT: Duration = Duration::from_secs(180);
const GUEST_SERIES: [&str; 5] = ["kick", "tx_used", "rx_used", "rx_irq", "rx_irq_wake"];

fn guest_elf() -> String {
    evmm_testhost::images::notify_guest()
        .unwrap_or_else(|e| panic!("{e}"))
        .display()
        .to_string()
}

/// The release binaries (evmm, evmm-net-echo, evmm-notify-floor, evmm-qemu), which
/// the runs take first on PATH, as the benchmark has them.
fn release_bins() -> PathBuf {
    let release = target_dir().join("release");
    for bin in ["evmm", "evmm-net-echo", "evmm-notify-floor", "evmm-qemu"] {
        assert!(
            release.join(bin).is_file(),
            "no {} (cargo build --release --workspace --bins first)",
            release.join(bin).display()
        );
    }
    release
}

/// One run in its own namespace; panics with the output unless the VMM exited 0.
fn run(vmm: Vec<String>) -> (NotifyRun, echo_netns::EchoRun) {
    let bins = release_bins();
    let r = echo_netns::run(TAP, &vmm, LIMIT, Some(&bins)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.vmm_status, Some(0), "output:\n{}", r.console);
    (NotifyRun::parse(&r.console), r)
}

fn check_guest(run: &NotifyRun, r: &echo_netns::EchoRun) {
    assert_eq!(run.done, Some(N), "output:\n{}", r.console);
    assert!(run.errors.is_empty(), "guest errors: {:?}", run.errors);
    for mode in GUEST_SERIES {
        let s = run
            .series("udp_echo", mode)
            .unwrap_or_else(|| panic!("no udp_echo/{mode} series:\n{}", r.console));
        assert_eq!(s.cycles.len() as u64, N, "{mode}");
        assert_eq!(s.errors, 0, "{mode}: wrong or missing echoes");
        if let Some(k) = s.kicks {
            assert!(k <= N, "{mode}: {k} kicks for {N} requests");
        }
    }
    // A poll pass and an interrupt pass: every probe answered once.
    let echo = r
        .echo
        .unwrap_or_else(|| panic!("no echo summary:\n{}", r.console));
    assert_eq!(echo.frames, 2 * N, "output:\n{}", r.console);
}

fn evmm(notify: &str) {
    let dir = tempfile::tempdir().unwrap();
    let metrics: PathBuf = dir.path().join("metrics.json");
    let vmm: Vec<String> = [
        "evmm",
        "--kernel",
        &guest_elf(),
        "--memory",
        "128",
        "--net",
        &format!("tap={TAP}"),
        "--notify",
        notify,
        "--cmdline",
        &format!("notify.net=1 notify.requests={N}"),
        "--metrics",
        &metrics.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (run, r) = run(vmm);
    check_guest(&run, &r);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let t = &m["devices"][0]["transport"];
    let q = &t["device"]["queues"][0];
    assert_eq!(q["tx_packets"], 2 * N, "{m}");
    assert_eq!(q["rx_packets"], 2 * N, "{m}");
    assert_eq!(q["malformed_chains"], 0, "{m}");
    let kicks = q["tx_kicks"].as_u64().unwrap();
    assert!(kicks > 0 && kicks <= 2 * N, "tx kicks {kicks}: {m}");
    let exits = t["notify_exits"].as_u64().unwrap();
    if notify == "exit" {
        assert!(exits >= kicks, "every kick an exit: {exits} < {kicks}: {m}");
    } else {
        assert_eq!(exits, 0, "ioeventfd: no QueueNotify exits: {m}");
    }
}

#[test]
fn udp_echoes_through_evmm_with_ioeventfd() {
    evmm("ioeventfd");
}

#[test]
fn udp_echoes_through_evmm_with_notify_exit() {
    evmm("exit");
}

#[test]
fn udp_echoes_through_qemu_microvm_virtio_net() {
    let vmm = notify_guest_microvm_net_argv(&guest_elf(), TAP, false, N as u32, 128);
    let (run, r) = run(vmm);
    check_guest(&run, &r);
}

#[test]
fn the_network_floor_goes_through_the_same_echo() {
    let vmm: Vec<String> = [
        "evmm-notify-floor",
        "--requests",
        &N.to_string(),
        "--tap",
        TAP,
        "--no-samples",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (run, r) = run(vmm);
    assert_eq!(run.done, Some(N), "output:\n{}", r.console);
    for mode in ["poll", "irq", "irq_wake"] {
        assert!(
            run.series("floor_echo", mode).is_some(),
            "no floor_echo/{mode}:\n{}",
            r.console
        );
    }
    assert_eq!(r.echo.map(|e| e.frames), Some(2 * N), "{}", r.console);
}
