//! KVM level: the evmm binary on this host's /dev/kvm with tiny hand-made ELF
//! "kernels" that write to the serial port and then power off, reset, triple-fault or
//! halt, also with a vhost-user-blk backend (qemu-storage-daemon) that the guest never
//! touches. They need a usable /dev/kvm and fail without one, saying so.

use evmm_testhost::{Backend, BackendKind};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LOAD_ADDR: u64 = 0x10_0000;

/// x86 code that works in 32-bit protected mode and in long mode.
mod code {
    /// `mov dx, port`.
    pub fn mov_dx(port: u16) -> Vec<u8> {
        let p = port.to_le_bytes();
        vec![0x66, 0xba, p[0], p[1]]
    }
    /// `mov al, v; out dx, al`.
    pub fn out_dx(v: u8) -> Vec<u8> {
        vec![0xb0, v, 0xee]
    }
    /// Writes `s` to COM1.
    pub fn print(s: &str) -> Vec<u8> {
        let mut c = mov_dx(0x3f8);
        for b in s.bytes() {
            c.extend(out_dx(b));
        }
        c
    }
    /// `hlt; jmp $-1` (halts forever unless the VM ends).
    pub const HALT: [u8; 3] = [0xf4, 0xeb, 0xfd];
    /// ACPI S5 through the sleep control register.
    pub fn poweroff() -> Vec<u8> {
        let mut c = mov_dx(0x600);
        c.extend(out_dx((5 << 2) | (1 << 5)));
        c
    }
    /// i8042 pulse reset.
    pub fn i8042_reset() -> Vec<u8> {
        vec![0xb0, 0xfe, 0xe6, 0x64]
    }
    /// `ud2`: with no IDT this escalates to a triple fault.
    pub const UD2: [u8; 2] = [0x0f, 0x0b];
}

/// A minimal ELF64 executable loading `code` at 1 MiB, optionally with a
/// PVH (XEN_ELFNOTE_PHYS32_ENTRY) note pointing at it.
fn elf(code: &[u8], pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let code_off: u64 = 0x1000;
    let note_off: u64 = 64 + 56 * u64::from(phnum);
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    f.extend_from_slice(&64u64.to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, phnum, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let phdr = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, size: u64| {
        f.extend_from_slice(&ty.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes()); // R+X
        for v in [off, addr, addr, size, size, 0x1000] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut f, 1, code_off, LOAD_ADDR, code.len() as u64);
    if pvh {
        phdr(&mut f, 4, note_off, 0, 20);
        f.extend_from_slice(&4u32.to_le_bytes()); // namesz
        f.extend_from_slice(&4u32.to_le_bytes()); // descsz
        f.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        f.extend_from_slice(b"Xen\0");
        f.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    }
    f.resize(code_off as usize, 0);
    f.extend_from_slice(code);
    f
}

/// These tests need /dev/kvm; without it they fail and say so.
fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests boot tiny guests and need a usable /dev/kvm: {e}");
    }
}

struct Outcome {
    status: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs evmm on `kernel` with a deadline; a timeout is reported as
/// `status: None` after killing it.
fn run_evmm(kernel: &Path, extra: &[&str], timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_evmm"))
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "64"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn evmm");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    Outcome {
        status,
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

fn write_kernel(dir: &tempfile::TempDir, name: &str, image: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, image).unwrap();
    path
}

const TIMEOUT: Duration = Duration::from_secs(60);

/// Boots `code` (as an ELF kernel, with a PVH note when `pvh`) under evmm with `args`.
fn run_tiny(code: &[u8], pvh: bool, args: &[&str]) -> Outcome {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(&dir, "k", &elf(code, pvh));
    run_evmm(&k, args, TIMEOUT)
}

#[test]
fn serial_output_then_acpi_poweroff_exits_0() {
    let mut c = code::print("hello from the guest\n");
    c.extend(code::poweroff());
    c.extend(code::HALT);
    let out = run_tiny(&c, false, &[]);
    assert_eq!(out.status, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "hello from the guest\n");
    eprintln!("poweroff run took {:?}", out.elapsed);
}

#[test]
fn i8042_reset_exits_0_with_several_vcpus() {
    let mut c = code::print("R");
    c.extend(code::i8042_reset());
    c.extend(code::HALT);
    // The APs never get started and sit in KVM_RUN: they must be kicked out.
    let out = run_tiny(&c, false, &["--cpus", "3"]);
    assert_eq!(out.status, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "R");
}

#[test]
fn triple_fault_exits_0_and_says_so_at_the_default_log_level() {
    let mut c = code::print("T");
    c.extend(code::UD2);
    let out = run_tiny(&c, false, &[]);
    assert_eq!(out.status, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "T");
    assert!(
        out.stderr.contains("triple fault"),
        "stderr: {}",
        out.stderr
    );
    // Where it died, read under the vCPU's seccomp filter.
    for part in [
        "vCPU 0 triple-faulted: rip 0x",
        " cr0 0x",
        " idt 0x",
        " exception ",
    ] {
        assert!(
            out.stderr.contains(part),
            "{part:?} in stderr: {}",
            out.stderr
        );
    }
}

#[test]
fn pvh_entry_is_used() {
    let mut c = code::print("PVH\n");
    c.extend(code::poweroff());
    c.extend(code::HALT);
    let out = run_tiny(&c, true, &["--log-level", "info"]);
    assert_eq!(out.status, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "PVH\n");
    assert!(out.stderr.contains("PVH entry"), "stderr: {}", out.stderr);
}

#[test]
fn sigterm_stops_a_halted_guest() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut c = code::print("up\n");
    c.extend(code::HALT);
    let k = write_kernel(&dir, "k", &elf(&c, false));
    let mut child = Command::new(env!("CARGO_BIN_EXE_evmm"))
        .arg("--kernel")
        .arg(&k)
        .args(["--memory", "64", "--cpus", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 3];
    stdout.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"up\n");
    // SAFETY: kill(2) on the child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < TIMEOUT, "evmm ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

/// Raw mode is set on a terminal stdin while the VM runs and restored when
/// evmm stops, here through the SIGTERM path.
#[test]
fn terminal_is_raw_while_running_and_restored_after_sigterm() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    require_kvm();
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the given locations; the
    // name, termios and winsize arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: both descriptors were just created and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let lflag = |fd: &OwnedFd| {
        // SAFETY: termios is plain data filled in by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and t is valid.
        assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
        t.c_lflag
    };
    assert_ne!(lflag(&slave) & libc::ICANON, 0);

    let dir = tempfile::tempdir().unwrap();
    let mut c = code::print("up\n");
    c.extend(code::HALT);
    let k = write_kernel(&dir, "k", &elf(&c, false));
    let mut child = Command::new(env!("CARGO_BIN_EXE_evmm"))
        .arg("--kernel")
        .arg(&k)
        .args(["--memory", "64"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 3];
    child.stdout.take().unwrap().read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"up\n");
    assert_eq!(lflag(&slave) & (libc::ICANON | libc::ECHO), 0, "not raw");
    // SAFETY: kill(2) on the child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_ne!(lflag(&slave) & libc::ICANON, 0, "terminal not restored");
    drop(master);
}

// ---- with a vhost-user-blk backend the tiny guest never touches ----

/// How long a vhost-user event may take to show.
const WAIT_VHOST_USER: Duration = Duration::from_secs(10);

/// `parts` concatenated, as an ELF kernel in `dir`.
fn tiny_kernel(dir: &tempfile::TempDir, parts: &[Vec<u8>]) -> std::path::PathBuf {
    write_kernel(dir, "kernel", &elf(&parts.concat(), false))
}

/// qemu-storage-daemon serving a 4 MiB file in `dir` as vhost-user-blk.
fn qemu_storage_daemon(dir: &tempfile::TempDir) -> Backend {
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    Backend::start(
        BackendKind::QemuStorageDaemon,
        &image,
        &dir.path().join("vu.sock"),
        1,
    )
    .unwrap_or_else(|e| panic!("{e} (Debian package qemu-system-x86)"))
}

#[test]
fn evmm_connects_runs_and_reports_the_device() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = qemu_storage_daemon(&dir);
    let kernel = tiny_kernel(
        &dir,
        &[code::print("ok\n"), code::poweroff(), code::HALT.to_vec()],
    );
    let metrics = dir.path().join("m.json");
    let out = Command::new(env!("CARGO_BIN_EXE_evmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64", "--log-level", "info", "--vhost-user-blk"])
        .arg(format!("socket={}", daemon.socket().display()))
        .arg("--metrics")
        .arg(&metrics)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    assert!(stderr.contains("vhost-user-blk@0xc0000000"), "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    let d = &m["devices"][0];
    assert_eq!(d["kind"], "vhost-user-blk");
    assert_eq!(d["path"], daemon.socket().display().to_string());
    assert_eq!(d["gsi"], 5);
    assert_eq!(d["transport"]["device_type"], 2);
    assert_eq!(d["transport"]["device"]["backend"], "connected");
    assert_eq!(d["transport"]["device"]["queues"], 1);
    assert_eq!(d["transport"]["device"]["activations"], 0);
}

#[test]
fn evmm_reports_a_dead_backend_and_keeps_running() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = qemu_storage_daemon(&dir);
    let kernel = tiny_kernel(&dir, &[code::print("up\n"), code::HALT.to_vec()]);
    let metrics = dir.path().join("m.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_evmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64", "--vhost-user-blk"])
        .arg(format!("socket={}", daemon.socket().display()))
        .arg("--metrics")
        .arg(&metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = [0u8; 3];
    child.stdout.take().unwrap().read_exact(&mut up).unwrap();
    assert_eq!(&up, b"up\n");
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.contains("lost") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    daemon.kill();
    let reported = rx.recv_timeout(WAIT_VHOST_USER).is_ok();
    // Still running: the guest is halted, evmm is waiting.
    assert!(child.try_wait().unwrap().is_none(), "evmm exited");
    // SAFETY: kill(2) on the child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < WAIT_VHOST_USER, "evmm did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap();
    assert!(reported, "no report of the lost backend: {stderr}");
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    let line = stderr.lines().find(|l| l.contains("lost")).unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("vhost-user-blk@0xc0000000"), "{line}");
    assert!(
        line.contains(&daemon.socket().display().to_string()),
        "{line}"
    );
    assert!(line.contains("hung up"), "{line}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert_eq!(m["devices"][0]["transport"]["device"]["backend"], "lost");
}
