//! KVM level (the notify guest on this host's /dev/kvm): evmm's and
//! evmm-vhost-user-blk's threads run under seccomp filters. Every thread of both has
//! one while a guest does I/O; a device worker that makes a syscall its filter
//! forbids ends evmm with a line naming the thread and the syscall; `--seccomp log`
//! lets that syscall run and `--seccomp off` installs no filter.

use evmm_testhost::images::target_dir;
use evmm_testhost::notify_output::NotifyRun;
use evmm_testhost::{Backend, BackendKind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The exit status of a process ended by a forbidden syscall (128 + SIGSYS).
const KILLED_STATUS: i32 = 128 + 31;
const TIMEOUT: Duration = Duration::from_secs(60);

fn guest_elf() -> PathBuf {
    evmm_testhost::images::notify_guest().unwrap_or_else(|e| panic!("{e}"))
}

fn evmm_bin() -> PathBuf {
    target_dir().join("release/evmm")
}

fn disk(dir: &Path) -> String {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    path.display().to_string()
}

/// evmm with the notify guest doing `requests` requests per series on `disk_args`.
fn evmm(dir: &Path, requests: u64, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(evmm_bin());
    cmd.args(["--kernel", guest_elf().to_str().unwrap(), "--memory", "128"])
        .args(["--cmdline", &format!("notify.requests={requests}")])
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("console")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
    cmd
}

/// Waits for `child` to end within TIMEOUT; kills it and panics otherwise.
fn wait(child: &mut Child, dir: &Path) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!(
                "evmm did not end in {TIMEOUT:?}; stderr:\n{}",
                read(dir, "stderr")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Each thread of `pid`: its name and its `Seccomp:` mode (0 none, 2 filter).
fn threads(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Seccomp: line for a thread of {pid}:\n{status}"));
        out.push((comm.trim().to_string(), mode));
    }
    out.sort();
    out
}

/// Waits until `pid` has threads named with each of `names` (prefixes); returns them.
fn wait_for_threads(pid: u32, names: &[&str], what: &str) -> Vec<(String, u32)> {
    let start = Instant::now();
    loop {
        let t = threads(pid);
        if names
            .iter()
            .all(|n| t.iter().any(|(comm, _)| comm.starts_with(n)))
        {
            return t;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "{what}: threads {names:?} did not all appear; it has {t:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn terminate(child: &mut Child, dir: &Path) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait(child, dir)
}

#[test]
fn every_thread_of_evmm_and_of_the_daemon_has_a_filter_while_the_guest_does_io() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let daemon_disk = dir.path().join("daemon.img");
    std::fs::File::create(&daemon_disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut argv = BackendKind::Evmm.argv(
        daemon_disk.to_str().unwrap(),
        &socket.display().to_string(),
        1,
    );
    argv[0] = target_dir()
        .join("release/evmm-vhost-user-blk")
        .display()
        .to_string();
    let mut daemon = Backend::spawn(
        BackendKind::Evmm,
        &argv,
        &socket,
        Some(&dir.path().join("daemon.log")),
    )
    .unwrap_or_else(|e| panic!("{e} (cargo build --release first)"));

    // Long enough a run to look at every thread while the guest's requests flow.
    let disk = disk(dir.path());
    let child = evmm(
        dir.path(),
        100_000,
        &[
            "--cpus",
            "2",
            "--disk",
            &format!("path={disk},engine=io_uring"),
            "--vhost-user-blk",
            &format!("socket={}", socket.display()),
        ],
        &[],
    );
    let mut child = { child }.spawn().expect("start target/release/evmm");
    let pid = child.id();
    let evmm_threads = wait_for_threads(
        pid,
        &[
            "vcpu0",
            "vcpu1",
            "evmm-spawner",
            "evmm-blk",
            "evmm-vu-monitor",
        ],
        "evmm",
    );
    let daemon_threads = threads(daemon.pid().expect("the daemon's pid"));
    let status = terminate(&mut child, dir.path());
    let daemon_status = daemon.terminate(Duration::from_secs(20));

    println!("evmm's threads (name, Seccomp): {evmm_threads:?}");
    println!("the daemon's threads: {daemon_threads:?}");
    for (comm, mode) in evmm_threads.iter().chain(&daemon_threads) {
        assert_eq!(*mode, 2, "thread {comm} has no seccomp filter");
    }
    // The daemon's main, signal and connection threads (relay, protocol, queue).
    assert!(
        daemon_threads.len() >= 4,
        "the daemon has only {daemon_threads:?}"
    );
    assert!(
        status.success(),
        "evmm after SIGTERM: {status}; stderr:\n{}",
        read(dir.path(), "stderr")
    );
    assert!(
        daemon_status.is_some_and(|s| s.success()),
        "daemon after SIGTERM: {daemon_status:?}\n{}",
        daemon.log()
    );
}

#[test]
fn a_forbidden_syscall_in_a_device_worker_ends_evmm_and_names_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path());
    let mut child = evmm(
        dir.path(),
        300,
        &["--disk", &format!("path={disk},engine=sync")],
        &[("EVMM_SECCOMP_PROBE", "blk")],
    )
    .spawn()
    .expect("start target/release/evmm");
    let status = wait(&mut child, dir.path());
    let stderr = read(dir.path(), "stderr");
    assert_eq!(
        status.code(),
        Some(KILLED_STATUS),
        "{status}; stderr:\n{stderr}"
    );
    let socket = libc::SYS_socket;
    // socket(AF_UNIX, SOCK_STREAM, 0): the first two arguments are in the report.
    assert!(
        stderr.contains(&format!(
            "seccomp: the virtio-blk worker thread made syscall {socket} (0x1, 0x1, ...), \
             which its filter forbids; the process ends"
        )),
        "stderr:\n{stderr}"
    );
    // Nothing was answered after the worker's first syscall: the guest never finished.
    assert!(NotifyRun::parse(&read(dir.path(), "console"))
        .done
        .is_none());
}

#[test]
fn log_mode_lets_the_forbidden_syscall_run_and_off_installs_no_filter() {
    for mode in ["log", "off"] {
        let dir = tempfile::tempdir().unwrap();
        let disk = disk(dir.path());
        let mut child = evmm(
            dir.path(),
            100_000,
            &[
                "--seccomp",
                mode,
                "--disk",
                &format!("path={disk},engine=sync"),
            ],
            &[("EVMM_SECCOMP_PROBE", "blk")],
        )
        .spawn()
        .expect("start target/release/evmm");
        let t = wait_for_threads(child.id(), &["vcpu0", "evmm-blk"], mode);
        if mode == "log" {
            let start = Instant::now();
            while !read(dir.path(), "stderr").contains("EVMM_SECCOMP_PROBE") {
                assert!(start.elapsed() < TIMEOUT, "the probe did not run");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // The worker's requests go on: evmm is still running a moment later.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "--seccomp {mode}: evmm ended; stderr:\n{}",
            read(dir.path(), "stderr")
        );
        let status = terminate(&mut child, dir.path());
        let stderr = read(dir.path(), "stderr");
        assert!(
            status.success(),
            "--seccomp {mode}: {status}; stderr:\n{stderr}"
        );
        let expected = if mode == "off" { 0 } else { 2 };
        for (comm, m) in &t {
            assert_eq!(*m, expected, "--seccomp {mode}: thread {comm}");
        }
        // Only a confined worker runs the probe.
        assert_eq!(
            stderr.contains("EVMM_SECCOMP_PROBE"),
            mode == "log",
            "--seccomp {mode}: stderr:\n{stderr}"
        );
    }
}

#[test]
fn a_bad_seccomp_value_is_refused() {
    let out = Command::new(evmm_bin())
        .args(["--kernel", "/nonexistent", "--seccomp", "strict"])
        .output()
        .expect("run target/release/evmm");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'strict' is not off, log or kill"),
        "{stderr}"
    );
}
