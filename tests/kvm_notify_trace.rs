//! KVM level, tracing: `evmm-notify-trace --here` (benches/notify-trace without the
//! nested run) cuts the notify guest's requests into stages on every disk and network
//! path of this host, from the host's tracepoints. The JSON lists every path (the
//! vhost-net ones where /dev/vhost-net exists) with its consumer, at least half of the
//! interrupt pass's requests cut into all their stages, the stages in order, and
//! their p50s adding up to the guest's own traced p50 within a tenth (each request's
//! stages add up to the guest's figure exactly; the p50s of the parts need not); the
//! swimlane has a panel per path. Figures are the benchmark's, not checked here.
//! Needs root (tracefs, namespaces, taps).

use evmm_testhost::images::target_dir;
use evmm_testhost::process::run_with_limit;
use serde_json::Value;
use std::time::Duration;

const REQUESTS: u64 = 20;

#[test]
fn every_path_of_this_host_is_cut_into_its_stages() {
    let release = target_dir().join("release");
    for bin in [
        "evmm-notify-trace",
        "evmm",
        "evmm-net-echo",
        "evmm-notify-floor",
    ] {
        assert!(
            release.join(bin).is_file(),
            "no {} (cargo build --release --workspace --bins first)",
            release.join(bin).display()
        );
    }
    let out_dir = target_dir().join("test-notify-trace");
    let _ = std::fs::remove_dir_all(&out_dir);
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
        "--here",
        "--requests",
        &REQUESTS.to_string(),
        "--out",
        &out_dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_with_limit(&argv, Duration::from_secs(600)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.status.and_then(|s| s.code()),
        Some(0),
        "evmm-notify-trace failed; output:\n{}",
        out.stdout
    );
    let json = std::fs::read_to_string(out_dir.join("notify-trace.json"))
        .unwrap_or_else(|e| panic!("no notify-trace.json: {e}"));
    let reports: Vec<Value> = serde_json::from_str(&json).expect("JSON");
    let mut expected = vec![
        "evmm ioeventfd + irqfd",
        "evmm --notify exit",
        "evmm + evmm-vhost-user-blk",
        "QEMU microvm",
        "net: evmm in-VMM worker",
        "net: evmm --notify exit",
        "net: QEMU microvm, vhost=off",
    ];
    if std::path::Path::new("/dev/vhost-net").exists() {
        expected.extend([
            "net: evmm vhost=on (kernel vhost-net)",
            "net: QEMU microvm, vhost=on",
        ]);
    }
    let names: Vec<&str> = reports.iter().filter_map(|r| r["path"].as_str()).collect();
    for name in &expected {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    let svg = std::fs::read_to_string(out_dir.join("notify-trace.svg")).expect("the swimlane");
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
        let net = name.starts_with("net:");
        let want: &[&str] = if net {
            &evmm_bench::kick_stages::NET_STAGES
        } else {
            &evmm_bench::kick_stages::STAGES
        };
        assert_eq!(stages[0], "store", "{name}");
        assert_eq!(&stages[1..], want, "{name}");
        let sum = r["sum_of_p50s_us"].as_f64().unwrap_or(0.0);
        let traced = r["traced_total_p50_us"].as_f64().unwrap_or(0.0);
        assert!(
            traced > 0.0 && (sum - traced).abs() <= traced * 0.1,
            "{name}: the stage p50s add up to {sum:.1} µs, the guest's traced p50 is {traced:.1} µs"
        );
    }
}
