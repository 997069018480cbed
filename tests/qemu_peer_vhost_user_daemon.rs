//! QEMU peer level: Debian's QEMU 7.2 as the vhost-user frontend (`vhost-user-blk-pci`) on
//! evmm-vhost-user-blk, with Debian's stock guest kernel: the data-integrity checks
//! of tests/linux_virtio_blk.rs, with 1 and with 2 queues. The guest writes its pattern with O_DIRECT and
//! the host file holds it; the host's pattern reads back in the guest; a verified
//! random workload passes and leaves the file with the checksum of the guest's shadow.
//! One daemon serves the three guests of a run one after the other (a real frontend
//! reconnecting), and stops on SIGTERM with exit status 0.
//!
//! QEMU runs here with TCG (where /dev/kvm emulates guest ring 0, as on PVM hosts,
//! Linux does not boot on it; `evmm-kvm-probe` tells), guest RAM in a shared memfd so the daemon can map it. The daemon
//! is `target/release/evmm-vhost-user-blk` (or `$EVMM_VHOST_USER_BLK`): `cargo build
//! --release -p evmm-vhost-user-blk` first.

use evmm_guest_tools::blk;
use evmm_testhost::guest::marker_fields;
use evmm_testhost::images::target_dir;
use evmm_testhost::qemu::tcg_base_argv;
use evmm_testhost::{Backend, BackendKind, GuestConsole, GuestImages};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest a guest may run (TCG is slow; a boot takes ~5 s here).
const GUEST_LIMIT: Duration = Duration::from_secs(600);
/// Disk size.
const DISK_BYTES: u64 = 64 << 20;
/// Operations of the random workload.
const RANDOM_OPS: u32 = 10_000;

/// The daemon binary: `$EVMM_VHOST_USER_BLK`, else the release build (scripts/test
/// builds it before the tests).
fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("EVMM_VHOST_USER_BLK") {
        return PathBuf::from(p);
    }
    let bin = target_dir().join("release").join("evmm-vhost-user-blk");
    assert!(
        bin.is_file(),
        "no {}: run cargo build --release -p evmm-vhost-user-blk",
        bin.display()
    );
    bin
}

/// Waits for `child` up to `limit`; kills it and returns None on timeout.
fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon on `disk` with `queues` queues, logging at info into `dir`.
fn start_daemon(dir: &Path, disk: &Path, queues: u16) -> Backend {
    let bin = daemon_binary();
    eprintln!("daemon: {}", bin.display());
    let socket = dir.join("vu.sock");
    let mut argv = BackendKind::Evmm.argv(
        &disk.display().to_string(),
        &socket.display().to_string(),
        queues,
    );
    argv[0] = bin.display().to_string();
    argv.extend(["--log-level".into(), "info".into()]);
    Backend::spawn(
        BackendKind::Evmm,
        &argv,
        &socket,
        Some(&dir.join("daemon.log")),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// QEMU with TCG booting the guest test `blk` with `args` on a vhost-user-blk-pci
/// disk served at `socket` with `queues` queues (and as many vCPUs, so the guest
/// driver uses them all).
fn qemu_argv(images: &GuestImages, socket: &Path, queues: u16, args: &[&str]) -> Vec<String> {
    let mem_mib = 512;
    tcg_base_argv(&[
        "-L",
        "/usr/share/qemu",
        "-M",
        "q35,accel=tcg",
        "-m",
        &format!("{mem_mib}M"),
        "-smp",
        &queues.to_string(),
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
        "-machine",
        "memory-backend=mem",
        "-kernel",
        &images.vmlinuz.display().to_string(),
        "-initrd",
        &images.initramfs.display().to_string(),
        "-append",
        &format!(
            "console=ttyS0 reboot=t panic=-1 quiet evmm.test=blk evmm.args={}",
            args.join(",")
        ),
        "-chardev",
        &format!("socket,id=c0,path={}", socket.display()),
        "-device",
        &format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"),
    ])
}

/// Boots the guest, which runs `evmm-guest-blk ARGS` on /dev/vda; returns the
/// console once the guest test passed.
fn boot(images: &GuestImages, dir: &Path, daemon: &Backend, queues: u16, args: &[&str]) -> String {
    let argv = qemu_argv(images, daemon.socket(), queues, args);
    let console_path = dir.join("console.log");
    let console_file = File::create(&console_path).unwrap();
    let start = Instant::now();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(console_file.try_clone().unwrap())
        .stderr(console_file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", argv[0]));
    let status = wait_or_kill(&mut child, GUEST_LIMIT);
    let console = std::fs::read_to_string(&console_path).unwrap_or_default();
    eprintln!(
        "guest {args:?}, {queues} queue(s): {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let report = || {
        format!(
            "command: {}\nconsole:\n{console}\ndaemon log:\n{}",
            argv.join(" "),
            daemon.log()
        )
    };
    let Some(status) = status else {
        panic!("QEMU killed after {GUEST_LIMIT:?}; {}", report());
    };
    assert!(status.success(), "QEMU failed ({status}); {}", report());
    let parsed = GuestConsole::parse(&console);
    assert!(parsed.started, "the guest did not start; {}", report());
    assert!(
        parsed.passed("blk"),
        "guest check {args:?} failed; {}",
        report()
    );
    console
}

/// The fields of the console line with `marker`.
fn marker(console: &str, name: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .find_map(|l| marker_fields(l, name))
        .unwrap_or_else(|| panic!("no {name} line; console:\n{console}"))
}

/// Counter `counter` of queue `q` in the daemon's last counters line
/// (`... counters: q0: wakeups=N in=N ...; q1: ...`).
fn queue_counter(log: &str, q: usize, counter: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("counters: ").map(|(_, c)| c))
        .unwrap_or_else(|| panic!("no counters in the daemon log:\n{log}"));
    let queue = line
        .split("; ")
        .find_map(|p| p.strip_prefix(&format!("q{q}: ")))
        .unwrap_or_else(|| panic!("no queue {q} in {line}"));
    queue
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{counter}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {counter} in {queue}"))
}

fn data_integrity(queues: u16) {
    eprintln!("route: QEMU with TCG on this host (the frontend needs no /dev/kvm)");
    let images = GuestImages::build().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("a.img");
    File::create(&disk).unwrap().set_len(DISK_BYTES).unwrap();
    let mut daemon = start_daemon(dir.path(), &disk, queues);

    // The guest writes its pattern with O_DIRECT and fsync: the file holds exactly it.
    let console = boot(
        &images,
        dir.path(),
        &daemon,
        queues,
        &["write-pattern", "/dev/vda"],
    );
    assert_eq!(marker(&console, "EVMM-BLK-WRITE-PATTERN")["ok"], "1");
    let bad = blk::verify_guest_pattern_file(&disk).unwrap();
    assert_eq!(
        bad, 0,
        "{bad} bytes of the file differ from the guest's pattern"
    );

    // The host's pattern reads back in the guest.
    blk::write_host_pattern(&disk).unwrap();
    let console = boot(
        &images,
        dir.path(),
        &daemon,
        queues,
        &["read-pattern", "/dev/vda"],
    );
    assert_eq!(marker(&console, "EVMM-BLK-READ-PATTERN")["bad_bytes"], "0");

    // A verified random workload; the file ends as the guest's shadow says.
    let ops = RANDOM_OPS.to_string();
    let console = boot(
        &images,
        dir.path(),
        &daemon,
        queues,
        &["random", "/dev/vda", &ops, "11"],
    );
    let report = marker(&console, "EVMM-BLK-RANDOM");
    assert_eq!(report["mismatches"], "0", "{report:?}");
    let done: u64 =
        report["reads"].parse::<u64>().unwrap() + report["writes"].parse::<u64>().unwrap();
    assert_eq!(done, u64::from(RANDOM_OPS));

    let socket = daemon.socket().to_path_buf();
    let status = daemon.terminate(Duration::from_secs(20));
    let log = daemon.log();
    let status = status.unwrap_or_else(|| panic!("daemon ignored SIGTERM:\n{log}"));
    eprintln!("daemon log:\n{log}");
    assert!(status.success(), "daemon exit status {status}:\n{log}");
    assert!(!socket.exists(), "the daemon left its socket behind");
    let checksum = format!("{:016x}", blk::fnv1a(&std::fs::read(&disk).unwrap()));
    assert_eq!(
        checksum, report["checksum"],
        "the file is not the guest's shadow"
    );

    // Three guests, three connections, each ended cleanly.
    assert_eq!(log.matches("frontend connected").count(), 3, "{log}");
    for q in 0..usize::from(queues) {
        assert!(
            queue_counter(&log, q, "wakeups") > 0,
            "queue {q} was never started by the guest:\n{log}"
        );
    }
    assert_eq!(queue_counter(&log, 0, "malformed"), 0);
}

#[test]
fn qemu_vhost_user_blk_one_queue_keeps_the_data() {
    data_integrity(1);
}

#[test]
fn qemu_vhost_user_blk_two_queues_keep_the_data() {
    data_integrity(2);
}
