//! KVM level (a bare-metal guest on this host's /dev/kvm): the notify guest's chaos
//! mode (`notify.chaos=SEED`, crates/notify-guest/src/chaos) drives evmm's two
//! virtio-blk disks as a hostile driver from two vCPUs, seeded: random register
//! accesses on every window, rings and descriptors pointing anywhere, resets with I/O
//! in flight, sweeps of unclaimed MMIO and ports. For each seed, evmm must:
//!
//! - stay up until the guest prints `CHAOS-DONE` (the guest then idles in HLT),
//!   and exit 0 within [`SIGTERM_LIMIT`] of a SIGTERM;
//! - keep its RSS under the guest's memory plus [`RSS_MARGIN_MIB`], and its own part
//!   (without the resident guest RAM, which grows as the device writes new pages)
//!   under [`OWN_RSS_MIB`];
//! - keep stderr under what the rate limits allow (see [`stderr_bound`]);
//! - leave the read-only disk and the tail of the writable disk that is not a
//!   whole sector (never visible to the guest) byte-identical.
//!
//! `EVMM_CHAOS_SEEDS=N` runs N more seeds (from [`SOAK_FIRST_SEED`], both notify
//! paths in turn) after the fixed ones; `EVMM_CHAOS_STEPS=N` changes the steps per
//! seed. A seed that ever fails gets a named test of its own (none has so far).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evmm_testhost::images::{repo_root, target_dir};
use evmm_virtio::ratelimit::{BURST, WINDOW_MS};

/// Guest memory (MiB).
const MEMORY_MIB: u64 = 128;
/// What evmm may use on top of the guest's memory: its own few MiB (about 8 here),
/// I/O buffers, thread stacks, with room to spare; a leak per request, reset or
/// unclaimed address would cross it in a soak.
const RSS_MARGIN_MIB: u64 = 64;
/// evmm's own resident memory (its RSS minus the resident part of guest RAM): about
/// 4 MiB here (code, heap, thread stacks, io_uring rings), with room to spare.
const OWN_RSS_MIB: u64 = 32;
/// Steps per seed in the fixed runs (about 3 s each here).
const STEPS: u64 = 600;
/// Seeds run on every `cargo test`, with ioeventfd kicks.
const SEEDS_IOEVENTFD: [u64; 4] = [1, 2, 3, 4];
/// Seeds run on every `cargo test`, with `--notify exit`.
const SEEDS_EXIT: [u64; 3] = [5, 6, 7];
/// First seed of the soak (`EVMM_CHAOS_SEEDS`).
const SOAK_FIRST_SEED: u64 = 1000;
/// How long evmm may take to exit after SIGTERM.
const SIGTERM_LIMIT: Duration = Duration::from_secs(5);
/// The writable disk: whole sectors, then a tail shorter than a sector that evmm does
/// not show the guest.
const RW_SECTORS: u64 = 32 * 1024;
const RW_TAIL: &[u8] = b"chaos: bytes past the last whole sector, never the guest's";
/// The read-only disk's size.
const RO_BYTES: usize = 4 << 20;
/// Lines evmm prints whatever the guest does (start-up warnings such as the partial
/// last sector).
const FIXED_LINES: u64 = 16;
/// The longest line evmm's logger writes for a guest-triggered message, with room.
const MAX_LINE_BYTES: u64 = 512;

/// What one run did.
struct Figures {
    seed: u64,
    notify: &'static str,
    steps: u64,
    notifies: u64,
    resets: u64,
    chains: u64,
    ap_chains: u64,
    ap_notifies: u64,
    max_rss_kib: u64,
    max_own_rss_kib: u64,
    stderr_lines: u64,
    stderr_bytes: u64,
    wall: Duration,
}

fn evmm_binary() -> PathBuf {
    let path = target_dir().join("release/evmm");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release -p evmm` first",
        path.display()
    );
    path
}

/// Deterministic bytes for the read-only disk.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The resident part of the guest RAM mapping (evmm's memfd `evmm-guest-ram`).
fn guest_ram_rss_kib(pid: u32) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut in_ram = false;
    let mut total = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let is_header = first.split_once('-').is_some_and(|(a, b)| {
            u64::from_str_radix(a, 16).is_ok() && u64::from_str_radix(b, 16).is_ok()
        });
        if is_header {
            in_ram = line.contains("evmm-guest-ram");
        } else if in_ram {
            if let Some(v) = line.strip_prefix("Rss:") {
                let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
                total = Some(total.unwrap_or(0) + kib);
            }
        }
    }
    total
}

/// Calls to `guest_warn!` in evmm's sources: each may log [`BURST`] lines per window.
fn guest_warn_sites() -> u64 {
    fn walk(dir: &Path, n: &mut u64) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, n);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                *n += text.matches("guest_warn!(").count() as u64;
            }
        }
    }
    let mut n = 0;
    for dir in ["crates/virtio/src", "vmm/src"] {
        walk(&repo_root().join(dir), &mut n);
    }
    assert!(n > 0, "no guest_warn! call found in evmm's sources");
    n
}

/// Most stderr lines a run of `wall` may print: every rate-limited call site its
/// [`BURST`] in each window the run spans, each guest-fault kind once per disk (64
/// kinds at most, see evmm_virtio::fault), and the fixed lines.
fn stderr_bound(wall: Duration, disks: u64) -> u64 {
    let windows = wall.as_millis() as u64 / WINDOW_MS + 2;
    guest_warn_sites() * BURST * windows + 64 * disks + FIXED_LINES
}

/// The last lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// A `key=value` field of the `CHAOS-DONE` line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

struct Running {
    child: Child,
    console: Arc<Mutex<Vec<u8>>>,
    max_rss_kib: u64,
    /// Peak of VmRSS minus the guest RAM's resident part.
    max_own_rss_kib: u64,
}

impl Running {
    fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap()).into_owned()
    }

    fn sample(&mut self) {
        let pid = self.child.id();
        if let (Some(rss), Some(ram)) = (vm_rss_kib(pid), guest_ram_rss_kib(pid)) {
            self.max_rss_kib = self.max_rss_kib.max(rss);
            self.max_own_rss_kib = self.max_own_rss_kib.max(rss.saturating_sub(ram));
        }
    }

    /// Waits for the exit, sampling; `None` when `limit` passed first.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            self.sample();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_seed(seed: u64, steps: u64, notify: &'static str) -> Figures {
    let guest = evmm_testhost::images::notify_guest().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw.img");
    let mut rw_bytes = vec![0u8; (RW_SECTORS * 512) as usize];
    rw_bytes.extend_from_slice(RW_TAIL);
    std::fs::write(&rw, &rw_bytes).unwrap();
    drop(rw_bytes);
    let ro = dir.path().join("ro.img");
    let ro_bytes = pattern(seed, RO_BYTES);
    std::fs::write(&ro, &ro_bytes).unwrap();
    let stderr_path = dir.path().join("stderr.txt");

    let start = Instant::now();
    let child = Command::new(evmm_binary())
        .args(["--kernel", guest.to_str().unwrap()])
        .args(["--memory", &MEMORY_MIB.to_string(), "--notify", notify])
        // The second vCPU publishes chains and kicks on a queue of its own while the
        // first resets that device, among everything else.
        .args(["--cpus", "2"])
        .args(["--disk", &format!("path={},queues=2", rw.display())])
        .args(["--disk", &format!("path={},readonly=on", ro.display())])
        .args([
            "--cmdline",
            &format!("notify.chaos={seed} notify.chaos.steps={steps}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("run evmm");
    let console = Arc::new(Mutex::new(Vec::new()));
    let mut run = Running {
        child,
        console: console.clone(),
        max_rss_kib: 0,
        max_own_rss_kib: 0,
    };
    let mut stdout = run.child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            console.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let stderr_tail = || {
        tail(
            &std::fs::read_to_string(&stderr_path).unwrap_or_default(),
            20,
        )
    };

    // Until the marker: evmm must not exit, and the marker must come in time
    // (generous: ~5 ms a step here, on a loaded machine several times that).
    let limit = Duration::from_secs(30) + Duration::from_millis(50 * steps);
    let done = loop {
        let console = run.console();
        if let Some(line) = console.lines().find(|l| l.starts_with("CHAOS-DONE")) {
            if console.contains(&format!("{line}\n")) {
                break line.to_string();
            }
        }
        if let Some(status) = run.child.try_wait().unwrap() {
            panic!(
                "seed {seed} ({notify}): evmm exited ({status}) before CHAOS-DONE; console:\n{}\nstderr:\n{}",
                tail(&console, 30),
                stderr_tail()
            );
        }
        assert!(
            start.elapsed() < limit,
            "seed {seed} ({notify}): no CHAOS-DONE within {limit:?}; console:\n{}\nstderr:\n{}",
            tail(&console, 30),
            stderr_tail()
        );
        run.sample();
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = start.elapsed();
    // The guest idles now, with whatever I/O it left in flight: evmm stays up.
    assert!(
        run.wait(Duration::from_millis(300)).is_none(),
        "seed {seed} ({notify}): evmm exited while the guest idled; stderr:\n{}",
        stderr_tail()
    );
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(run.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let status = run.wait(SIGTERM_LIMIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "seed {seed} ({notify}): after SIGTERM evmm {}; stderr:\n{}",
        status.map_or(format!("still ran after {SIGTERM_LIMIT:?}"), |s| format!(
            "ended with {s}"
        )),
        stderr_tail()
    );

    let console = run.console();
    for bad in ["NOTIFY-FAULT", "NOTIFY-PANIC", "NOTIFY-ERROR"] {
        assert!(
            !console.contains(bad),
            "seed {seed} ({notify}): the guest reported {bad}:\n{}",
            tail(&console, 30)
        );
    }
    let figures = Figures {
        seed,
        notify,
        steps: field(&done, "steps"),
        notifies: field(&done, "notifies"),
        resets: field(&done, "resets"),
        chains: field(&done, "chains"),
        ap_chains: field(&done, "ap_chains"),
        ap_notifies: field(&done, "ap_notifies"),
        max_rss_kib: run.max_rss_kib,
        max_own_rss_kib: run.max_own_rss_kib,
        stderr_lines: 0,
        stderr_bytes: 0,
        wall,
    };
    assert_eq!(figures.steps, steps, "{done}");
    assert_eq!(
        (field(&done, "ap"), field(&done, "ap_stopped")),
        (1, 1),
        "seed {seed}: the second vCPU did not start or stop: {done}"
    );
    assert!(
        figures.ap_chains > 0 && figures.ap_notifies > 0,
        "seed {seed}: the second vCPU published nothing: {done}"
    );
    assert!(
        figures.notifies > 0 && figures.resets > 0 && figures.chains > 0,
        "seed {seed}: the guest kicked, reset or built nothing: {done}"
    );

    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    let figures = Figures {
        stderr_lines: stderr.lines().count() as u64,
        stderr_bytes: stderr.len() as u64,
        ..figures
    };
    let rss_bound = (MEMORY_MIB + RSS_MARGIN_MIB) * 1024;
    assert!(
        figures.max_rss_kib > 0 && figures.max_rss_kib <= rss_bound,
        "seed {seed} ({notify}): VmRSS peaked at {} KiB (bound {rss_bound} KiB; 0: never sampled, or no evmm-guest-ram mapping in /proc/PID/smaps)",
        figures.max_rss_kib
    );
    assert!(
        figures.max_own_rss_kib <= OWN_RSS_MIB * 1024,
        "seed {seed} ({notify}): evmm's own RSS (without guest RAM) peaked at {} KiB (bound {} KiB)",
        figures.max_own_rss_kib,
        OWN_RSS_MIB * 1024
    );
    let lines_bound = stderr_bound(wall, 2);
    assert!(
        figures.stderr_lines <= lines_bound && figures.stderr_bytes <= lines_bound * MAX_LINE_BYTES,
        "seed {seed} ({notify}): {} stderr lines, {} bytes (bounds {lines_bound} lines, {} bytes); last lines:\n{}",
        figures.stderr_lines,
        figures.stderr_bytes,
        lines_bound * MAX_LINE_BYTES,
        tail(&stderr, 20)
    );

    assert!(
        std::fs::read(&ro).unwrap() == ro_bytes,
        "seed {seed} ({notify}): the read-only disk changed"
    );
    let after = std::fs::read(&rw).unwrap();
    assert_eq!(
        after.len() as u64,
        RW_SECTORS * 512 + RW_TAIL.len() as u64,
        "seed {seed} ({notify}): the writable disk's size changed"
    );
    assert!(
        &after[(RW_SECTORS * 512) as usize..] == RW_TAIL,
        "seed {seed} ({notify}): the part of the writable disk past its last whole sector changed"
    );
    eprintln!(
        "seed={} notify={} steps={} notifies={} resets={} chains={} ap_chains={} ap_notifies={} max_rss_kib={} max_own_rss_kib={} stderr_lines={} stderr_bytes={} wall={:?}",
        figures.seed,
        figures.notify,
        figures.steps,
        figures.notifies,
        figures.resets,
        figures.chains,
        figures.ap_chains,
        figures.ap_notifies,
        figures.max_rss_kib,
        figures.max_own_rss_kib,
        figures.stderr_lines,
        figures.stderr_bytes,
        figures.wall
    );
    figures
}

/// The steps per seed: `EVMM_CHAOS_STEPS` or `default`.
fn steps(default: u64) -> u64 {
    match std::env::var("EVMM_CHAOS_STEPS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("EVMM_CHAOS_STEPS={v}: expected a number")),
        Err(_) => default,
    }
}

/// Runs `seeds` in order and prints a summary of their figures.
fn run_all(seeds: &[(u64, &'static str)], steps: u64) {
    let all: Vec<Figures> = seeds
        .iter()
        .map(|&(seed, notify)| run_seed(seed, steps, notify))
        .collect();
    let sum = |f: fn(&Figures) -> u64| all.iter().map(f).sum::<u64>();
    eprintln!(
        "{} seeds, {steps} steps each: notifies={} resets={} chains={} ap_chains={} ap_notifies={} max_rss_kib={} max_own_rss_kib={} max_stderr_lines={} max_stderr_bytes={} wall_max={:?} wall_mean={:?}",
        all.len(),
        sum(|f| f.notifies),
        sum(|f| f.resets),
        sum(|f| f.chains),
        sum(|f| f.ap_chains),
        sum(|f| f.ap_notifies),
        all.iter().map(|f| f.max_rss_kib).max().unwrap_or(0),
        all.iter().map(|f| f.max_own_rss_kib).max().unwrap_or(0),
        all.iter().map(|f| f.stderr_lines).max().unwrap_or(0),
        all.iter().map(|f| f.stderr_bytes).max().unwrap_or(0),
        all.iter().map(|f| f.wall).max().unwrap_or_default(),
        all.iter().map(|f| f.wall).sum::<Duration>() / all.len().max(1) as u32,
    );
}

/// The fixed ioeventfd seeds, then `EVMM_CHAOS_SEEDS` more (both notify paths in turn).
#[test]
fn chaos_seeds_under_evmm_with_ioeventfd() {
    let soak: u64 = match std::env::var("EVMM_CHAOS_SEEDS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("EVMM_CHAOS_SEEDS={v}: expected a number")),
        Err(_) => 0,
    };
    let seeds: Vec<(u64, &str)> = SEEDS_IOEVENTFD
        .iter()
        .map(|&s| (s, "ioeventfd"))
        .chain((0..soak).map(|i| {
            let notify = if i % 2 == 0 { "ioeventfd" } else { "exit" };
            (SOAK_FIRST_SEED + i, notify)
        }))
        .collect();
    run_all(&seeds, steps(STEPS));
}

#[test]
fn chaos_seeds_under_evmm_with_notify_exit() {
    let seeds: Vec<(u64, &str)> = SEEDS_EXIT.iter().map(|&s| (s, "exit")).collect();
    run_all(&seeds, steps(STEPS));
}
