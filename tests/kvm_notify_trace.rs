//! KVM level, tracing: `evmm-notify-trace` (benches/notify-trace) cuts the notify
//! guest's requests into stages on every disk and network path of this host, from the
//! host's tracepoints, and then every network path again in the nested test host, where
//! /dev/vhost-net exists and guest interrupts are injected as on a host that runs guest
//! ring 0 natively (`kvm_inj_virq`, then `kvm_entry`, instead of PVM's emulated first
//! instruction). Each JSON lists every path with its consumer, at least half of the
//! interrupt pass's requests cut into all their stages, the stages in order, and at
//! most a tenth of the cuts longer than the guest's own kick → handler figure (which
//! a cut paired with the wrong kick would be); the swimlanes have a panel per path.
//! Figures are the benchmark's, not checked here (the p50s of the stages need not add
//! up to the p50 of the whole, and on a loaded machine they do not).
//! Needs root (tracefs, namespaces, taps) and the nested host.

use evmm_testhost::images::target_dir;
use evmm_testhost::process::run_with_limit;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const REQUESTS: u64 = 20;
/// Relative, so that the nested run's files come back to the same place.
const OUT: &str = "target/test-notify-trace";

const NET_PATHS: [&str; 3] = [
    "net: evmm in-VMM worker",
    "net: evmm --notify exit",
    "net: QEMU microvm, vhost=off",
];
const VHOST_PATHS: [&str; 2] = [
    "net: evmm vhost=on (kernel vhost-net)",
    "net: QEMU microvm, vhost=on",
];

/// The checks of one JSON and its swimlane: every `expected` path, each complete.
fn check(json: &Path, svg: &Path, expected: &[&str]) {
    let text =
        std::fs::read_to_string(json).unwrap_or_else(|e| panic!("no {}: {e}", json.display()));
    let reports: Vec<Value> = serde_json::from_str(&text).expect("JSON");
    let names: Vec<&str> = reports.iter().filter_map(|r| r["path"].as_str()).collect();
    for name in expected {
        assert!(
            names.contains(name),
            "{name} missing from {names:?} ({})",
            json.display()
        );
    }
    let svg = std::fs::read_to_string(svg).unwrap_or_else(|e| panic!("no swimlane: {e}"));
    for r in &reports {
        let name = r["path"].as_str().unwrap_or_default();
        assert!(svg.contains(name), "no panel for {name}");
        assert!(
            r["requests"].as_u64().unwrap_or(0) >= REQUESTS / 2,
            "{name}: too few requests with all their stages: {r}"
        );
        assert!(
            !r["consumer"].as_str().unwrap_or_default().is_empty(),
            "{r}"
        );
        let stages: Vec<&str> = r["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .filter_map(|s| s["stage"].as_str())
            .collect();
        let want: &[&str] = if name.starts_with("net:") {
            &evmm_bench::kick_stages::NET_STAGES
        } else {
            &evmm_bench::kick_stages::STAGES
        };
        assert_eq!(stages[0], "store", "{name}");
        assert_eq!(&stages[1..], want, "{name}");
        let requests = r["requests"].as_u64().unwrap_or(0);
        let longer = r["cut_longer_than_guest"].as_u64().unwrap_or(u64::MAX);
        assert!(
            longer * 10 <= requests,
            "{name}: {longer} of {requests} cuts are longer than the guest's own figure: {r}"
        );
    }
}

#[test]
fn every_path_here_and_every_network_path_in_the_nested_host_is_cut_into_its_stages() {
    let release = target_dir().join("release");
    for bin in [
        "evmm-notify-trace",
        "evmm",
        "evmm-net-echo",
        "evmm-notify-floor",
        "evmm-vhost-user-blk",
    ] {
        assert!(
            release.join(bin).is_file(),
            "no {} (cargo build --release --workspace --bins first)",
            release.join(bin).display()
        );
    }
    let _ = std::fs::remove_dir_all(OUT);
    let path = format!(
        "{}:{}",
        release.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let argv: Vec<String> = [
        "env",
        &format!("PATH={path}"),
        "sh",
        "-c",
        "exec \"$0\" \"$@\" 2>&1",
        "evmm-notify-trace",
        "--requests",
        &REQUESTS.to_string(),
        "--out",
        OUT,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_with_limit(&argv, Duration::from_secs(1200)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.status.and_then(|s| s.code()),
        Some(0),
        "evmm-notify-trace failed; output:\n{}",
        out.stdout
    );
    let out = Path::new(OUT);
    let mut here = vec![
        "evmm ioeventfd + irqfd",
        "evmm --notify exit",
        "evmm + evmm-vhost-user-blk",
        "QEMU microvm",
    ];
    here.extend(NET_PATHS);
    if Path::new("/dev/vhost-net").exists() {
        here.extend(VHOST_PATHS);
    }
    check(
        &out.join("notify-trace.json"),
        &out.join("notify-trace.svg"),
        &here,
    );
    let nested: Vec<&str> = NET_PATHS
        .iter()
        .chain(VHOST_PATHS.iter())
        .copied()
        .collect();
    check(
        &out.join("notify-trace-nested.json"),
        &out.join("notify-trace-nested.svg"),
        &nested,
    );
}
