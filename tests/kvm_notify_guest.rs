//! KVM level (a bare-metal guest on this host's /dev/kvm): the notify guest (crates/notify-guest) completes its requests under
//! evmm (both notify paths), under evmm as a vhost-user frontend to
//! evmm-vhost-user-blk, and under QEMU microvm, every GET_ID answer is the disk's id,
//! and the counters add up. The guest measures in its ring 3, so it runs on
//! this host's /dev/kvm directly, PVM or not.

use evmm_testhost::images::target_dir;
use evmm_testhost::notify_output::NotifyRun;
use evmm_testhost::process::run_with_limit;
use evmm_testhost::qemu::notify_guest_microvm_argv;
use evmm_testhost::qemu_cpu::{kvm_cpu_model, FALLBACK};
use evmm_testhost::{Backend, BackendKind};
use std::path::PathBuf;
use std::process::Command;

const N: u64 = 300;
const ID: &str = "notify-test-id";

fn guest_elf() -> PathBuf {
    evmm_testhost::images::notify_guest().unwrap_or_else(|e| panic!("{e}"))
}

fn disk(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    path.display().to_string()
}

/// Checks a notify-guest run: every series has N samples and no errors (a wrong GET_ID
/// answer counts as an error in the guest), and the id is the disk's.
fn check(run: &NotifyRun, console: &str) {
    assert_eq!(
        run.done,
        Some(N),
        "the guest did not finish; console:\n{console}"
    );
    assert!(run.errors.is_empty(), "guest errors: {:?}", run.errors);
    assert_eq!(run.id.as_deref(), Some(ID), "GET_ID answered {:?}", run.id);
    for kind in ["get_id", "read"] {
        for mode in ["poll", "kick", "irq", "irq_wake"] {
            let s = run
                .series(kind, mode)
                .unwrap_or_else(|| panic!("no {kind}/{mode} series:\n{console}"));
            assert_eq!(s.cycles.len() as u64, N, "{kind}/{mode}");
            assert_eq!(s.errors, 0, "{kind}/{mode} had errors");
        }
    }
}

fn evmm(notify: &str) {
    let guest = guest_elf();
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.json");
    let out = Command::new(target_dir().join("release/evmm"))
        .args([
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            "128",
            "--notify",
            notify,
        ])
        .args(["--disk", &format!("path={},id={ID}", disk(&dir))])
        .args(["--cmdline", &format!("notify.requests={N}")])
        .arg("--metrics")
        .arg(&metrics)
        .output()
        .expect("run target/release/evmm (cargo build --release first)");
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "evmm failed: {}\n{console}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&NotifyRun::parse(&console), &console);

    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let t = &m["devices"][0]["transport"];
    let q = &t["device"]["queues"][0];
    let get = |k: &str| q[k].as_u64().unwrap_or_else(|| panic!("no {k} in {q}"));
    // Two GET_ID series (poll, irq) and two read series of N requests each.
    assert_eq!(get("req_get_id"), 2 * N, "{q}");
    assert_eq!(get("req_in"), 2 * N, "{q}");
    assert!(get("kicks") >= get("wakeups"), "kicks < wake-ups: {q}");
    // The disk polls by default (adaptive): the guest skips the kicks it is asked to
    // skip, and every request came by a kick or was found by polling.
    let polled = t["device"]["polling"]["polled_requests"]
        .as_u64()
        .unwrap_or_else(|| panic!("no polling counters in {t}"));
    assert!(get("kicks") + polled >= 4 * N, "{t}");
    let exits = t["notify_exits"].as_u64().unwrap();
    match notify {
        "ioeventfd" => assert_eq!(exits, 0, "{t}"),
        _ => assert_eq!(exits, get("kicks"), "{t}"),
    }
}

#[test]
fn guest_completes_under_evmm_with_ioeventfd() {
    evmm("ioeventfd");
}

#[test]
fn guest_completes_under_evmm_with_notify_exit() {
    evmm("exit");
}

#[test]
fn guest_completes_through_evmm_vhost_user_blk() {
    let guest = guest_elf();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&dir);
    let socket = dir.path().join("blk.sock");
    let mut argv = BackendKind::Evmm.argv(&disk, &socket.display().to_string(), 1);
    argv[0] = target_dir()
        .join("release/evmm-vhost-user-blk")
        .display()
        .to_string();
    argv.extend([
        "--id".into(),
        ID.into(),
        "--log-level".into(),
        "info".into(),
    ]);
    let mut daemon = Backend::spawn(
        BackendKind::Evmm,
        &argv,
        &socket,
        Some(&dir.path().join("daemon.log")),
    )
    .unwrap_or_else(|e| panic!("{e} (cargo build --release first)"));
    let metrics = dir.path().join("metrics.json");
    let evmm = target_dir().join("release/evmm").display().to_string();
    let argv = [
        evmm.as_str(),
        "--kernel",
        guest.to_str().unwrap(),
        "--memory",
        "128",
        "--vhost-user-blk",
        &format!("socket={}", socket.display()),
        "--cmdline",
        &format!("notify.requests={N}"),
        "--metrics",
        metrics.to_str().unwrap(),
    ];
    let out = run_with_limit(&argv, std::time::Duration::from_secs(120))
        .expect("run target/release/evmm (cargo build --release first)");
    let console = &out.stdout;
    assert!(
        out.status.is_some_and(|s| s.success()),
        "evmm failed or hung ({:?}); its messages are above; console:\n{console}",
        out.status
    );
    // The GET_ID answers come from the daemon's --id.
    check(&NotifyRun::parse(console), console);

    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let t = &m["devices"][0]["transport"];
    assert_eq!(
        t["notify_exits"], 0,
        "kicks went to the daemon by ioeventfd: {t}"
    );
    assert_eq!(t["device"]["backend"], "connected", "{t}");
    assert_eq!(t["device"]["taken_over"], false, "{t}");

    let status = daemon.terminate(std::time::Duration::from_secs(20));
    let log = daemon.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon: {status:?}\n{log}"
    );
    // The daemon served the reads (two series of N) and saw no bad chain.
    let counters = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("counters: q0: ").map(|(_, c)| c.to_string()))
        .unwrap_or_else(|| panic!("no counters in the daemon's log:\n{log}"));
    let counter = |key: &str| -> u64 {
        counters
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| panic!("no {key} in {counters}"))
    };
    assert_eq!(counter("in="), 2 * N, "{log}");
    assert_eq!(counter("malformed="), 0, "{log}");
}

/// The guest under QEMU microvm with CPU model `cpu`.
fn qemu_microvm(cpu: &str) {
    let guest = guest_elf();
    let dir = tempfile::tempdir().unwrap();
    let argv =
        notify_guest_microvm_argv(cpu, guest.to_str().unwrap(), &disk(&dir), ID, N as u32, 128);
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .expect("qemu-system-x86_64 is needed (apt-get install qemu-system-x86)");
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "QEMU failed: {}\n{console}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&NotifyRun::parse(&console), &console);
}

#[test]
fn guest_completes_under_qemu_microvm() {
    let cpu = kvm_cpu_model().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("QEMU's CPU model: {cpu}");
    qemu_microvm(&cpu.model);
}

/// The CPU model used where the host's KVM refuses `-cpu host`, run on every host.
#[test]
fn guest_completes_under_qemu_microvm_with_the_fallback_cpu_model() {
    qemu_microvm(FALLBACK);
}
